{
  "targets": [
    {
      "target_name": "qledger_native",
      "sources": ["native/qledger-native.c"],
      "cflags": ["-O2", "-Wall"],
      "libraries": ["-ldl", "-lpthread"]
    }
  ]
}

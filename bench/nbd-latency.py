# 4 KiB random reads or writes through an NBD export, at queue depth 1 or more (libnbd's Python
# bindings, Debian python3-libnbd). Prints microseconds per request: at depth 1 the latency, deeper
# the time per completed request (one over the rate). Usage: nbd-latency.py URI read|write DEPTH COUNT
import random
import sys
import time

import nbd

uri, mode, depth, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
rnd = random.Random(42)
offsets = [rnd.randrange(blocks) * 4096 for _ in range(count)]
payload = b'\x5a' * 4096
t0 = time.perf_counter()
if depth == 1:
    for off in offsets:
        if mode == 'read':
            h.pread(4096, off)
        else:
            h.pwrite(payload, off)
else:
    issued = 0
    while issued < count or h.aio_in_flight() > 0:
        while issued < count and h.aio_in_flight() < depth:
            # a completion callback returning 1 retires its command
            if mode == 'read':
                h.aio_pread(nbd.Buffer(4096), offsets[issued], completion=lambda *_: 1)
            else:
                h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(payload)), offsets[issued], completion=lambda *_: 1)
            issued += 1
        h.poll(-1)
if mode == 'write':
    h.flush()
elapsed = time.perf_counter() - t0
h.shutdown()
print(f'{elapsed / count * 1e6:.1f}')

/*
 * Small POSIX helpers Node's standard library lacks, for qledger:
 *   seekData(fd, offset) / seekHole(fd, offset): lseek(2) with SEEK_DATA /
 *     SEEK_HOLE; -1 when there is no data at or after offset (ENXIO).
 *     `map` needs them to tell holes from data the way QEMU does.
 *   fallocate(fd, mode, offset, length): fallocate(2); mode 0 allocates,
 *     1 punches a hole (PUNCH_HOLE|KEEP_SIZE), 2 zeroes a range (ZERO_RANGE).
 *   ofdLock(fd, start, length, take): an open-file-description byte-range
 *     lock (fcntl F_OFD_SETLK), shared when take is 1, released when 0; the
 *     locks QEMU's file driver uses to advertise permissions.
 *   ofdHeld(fd, start, length): whether another open file description holds
 *     a lock there (F_OFD_GETLK asking for an exclusive lock), as QEMU tests.
 *   copyRange(fdIn, offIn, fdOut, offOut, length): copy_file_range(2), bytes
 *     copied inside the kernel (no trip through user memory); -1 where the
 *     kernel or the file systems cannot (EXDEV, EINVAL, EOPNOTSUPP, ENOSYS),
 *     so that the caller copies through a buffer instead.
 *   writeBehind(fd, offset, length): sync_file_range(2) with
 *     SYNC_FILE_RANGE_WRITE: starts writing the range's dirty pages back
 *     without waiting, so a later fdatasync finds less to write; false when
 *     it cannot (a hint, never an error).
 *   zstdCompress(data, level): one zstd frame (ZSTD_compress, content size
 *     in the frame header) from the system's libzstd, opened with dlopen at
 *     the first call, so that no zstd header or library is needed to build
 *     and none at run time unless compressing; undefined where libzstd.so.1
 *     is missing. Node 20's zlib has no zstd compressor; this is the native
 *     one QEMU links, several times faster than a WebAssembly build.
 * Errors are thrown as JS errors carrying the errno name in `code`.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>

static napi_value throw_errno(napi_env env, int err, const char *what) {
  char msg[128];
  const char *code = err == ENXIO ? "ENXIO" : err == EOPNOTSUPP ? "EOPNOTSUPP" : err == EINVAL ? "EINVAL" : err == ENOSPC ? "ENOSPC" : err == EAGAIN || err == EACCES ? "EAGAIN" : "EIO";
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  napi_throw_error(env, code, msg);
  return NULL;
}

static int get_args(napi_env env, napi_callback_info info, size_t want, double *out) {
  napi_value argv[4];
  size_t argc = 4;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) return -1;
  for (size_t i = 0; i < want; i++)
    if (napi_get_value_double(env, argv[i], &out[i]) != napi_ok) return -1;
  return 0;
}

static napi_value do_seek(napi_env env, napi_callback_info info, int whence) {
  double a[2];
  napi_value r;
  if (get_args(env, info, 2, a)) return throw_errno(env, EINVAL, "seek");
  off_t o = lseek((int)a[0], (off_t)a[1], whence);
  if (o < 0) {
    if (errno == ENXIO) {
      napi_create_double(env, -1, &r);
      return r;
    }
    return throw_errno(env, errno, "lseek");
  }
  napi_create_double(env, (double)o, &r);
  return r;
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_DATA); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_HOLE); }

static napi_value do_fallocate(napi_env env, napi_callback_info info) {
  double a[4];
  if (get_args(env, info, 4, a)) return throw_errno(env, EINVAL, "fallocate");
  int mode = 0;
  if ((int)a[1] == 1) mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
  else if ((int)a[1] == 2) mode = FALLOC_FL_ZERO_RANGE;
  if (fallocate((int)a[0], mode, (off_t)a[2], (off_t)a[3]) < 0) return throw_errno(env, errno, "fallocate");
  return NULL;
}

/* A byte-range lock description for fcntl: bytes [start, start + len) of type. */
static struct flock byte_range(double start, double len, short type) {
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)start;
  fl.l_len = (off_t)len;
  fl.l_type = type;
  return fl;
}

static napi_value ofd_lock(napi_env env, napi_callback_info info) {
  double a[4];
  if (get_args(env, info, 4, a)) return throw_errno(env, EINVAL, "ofdLock");
  struct flock fl = byte_range(a[1], a[2], (int)a[3] ? F_RDLCK : F_UNLCK);
  if (fcntl((int)a[0], F_OFD_SETLK, &fl) < 0) return throw_errno(env, errno, "fcntl(F_OFD_SETLK)");
  return NULL;
}

static napi_value ofd_held(napi_env env, napi_callback_info info) {
  double a[3];
  napi_value r;
  if (get_args(env, info, 3, a)) return throw_errno(env, EINVAL, "ofdHeld");
  struct flock fl = byte_range(a[1], a[2], F_WRLCK);
  if (fcntl((int)a[0], F_OFD_GETLK, &fl) < 0) return throw_errno(env, errno, "fcntl(F_OFD_GETLK)");
  napi_get_boolean(env, fl.l_type != F_UNLCK, &r);
  return r;
}

static napi_value copy_range(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  size_t argc = 5;
  double a[5];
  napi_value r;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5) return throw_errno(env, EINVAL, "copyRange");
  for (size_t i = 0; i < 5; i++)
    if (napi_get_value_double(env, argv[i], &a[i]) != napi_ok) return throw_errno(env, EINVAL, "copyRange");
  off64_t in = (off64_t)a[1], out = (off64_t)a[3];
  ssize_t n = copy_file_range((int)a[0], &in, (int)a[2], &out, (size_t)a[4], 0);
  if (n < 0) {
    if (errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP || errno == ENOSYS) {
      napi_create_double(env, -1, &r);
      return r;
    }
    return throw_errno(env, errno, "copy_file_range");
  }
  napi_create_double(env, (double)n, &r);
  return r;
}

static napi_value write_behind(napi_env env, napi_callback_info info) {
  double a[3];
  napi_value r;
  if (get_args(env, info, 3, a)) return throw_errno(env, EINVAL, "writeBehind");
  napi_get_boolean(env, sync_file_range((int)a[0], (off64_t)a[1], (off64_t)a[2], SYNC_FILE_RANGE_WRITE) == 0, &r);
  return r;
}

/* libzstd's stable API, declared here so the build needs no zstd.h */
typedef size_t (*zstd_bound_fn)(size_t);
typedef size_t (*zstd_compress_fn)(void *, size_t, const void *, size_t, int);
typedef unsigned (*zstd_is_error_fn)(size_t);
static zstd_bound_fn zstd_bound;
static zstd_compress_fn zstd_compress;
static zstd_is_error_fn zstd_is_error;
static pthread_once_t zstd_once = PTHREAD_ONCE_INIT;

static void zstd_load(void) {
  void *h = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!h) return;
  zstd_bound = (zstd_bound_fn)dlsym(h, "ZSTD_compressBound");
  zstd_compress = (zstd_compress_fn)dlsym(h, "ZSTD_compress");
  zstd_is_error = (zstd_is_error_fn)dlsym(h, "ZSTD_isError");
  if (!zstd_bound || !zstd_compress || !zstd_is_error) zstd_compress = NULL;
}

static napi_value zstd_compress_js(napi_env env, napi_callback_info info) {
  napi_value argv[2], r;
  size_t argc = 2;
  double level;
  void *data;
  size_t length;
  napi_typedarray_type type;
  napi_value ab;
  size_t off;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_typedarray_info(env, argv[0], &type, &length, &data, &ab, &off) != napi_ok || type != napi_uint8_array ||
      napi_get_value_double(env, argv[1], &level) != napi_ok)
    return throw_errno(env, EINVAL, "zstdCompress");
  pthread_once(&zstd_once, zstd_load);
  if (!zstd_compress) {
    napi_get_undefined(env, &r);
    return r;
  }
  size_t cap = zstd_bound(length);
  void *out = malloc(cap ? cap : 1);
  if (!out) return throw_errno(env, ENOMEM, "zstdCompress");
  size_t n = zstd_compress(out, cap, data, length, (int)level);
  if (zstd_is_error(n)) {
    free(out);
    return throw_errno(env, EINVAL, "ZSTD_compress");
  }
  napi_status st = napi_create_buffer_copy(env, n, out, NULL, &r);
  free(out);
  if (st != napi_ok) return throw_errno(env, ENOMEM, "zstdCompress");
  return r;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor d[] = {
    {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_default, NULL},
    {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_default, NULL},
    {"fallocate", NULL, do_fallocate, NULL, NULL, NULL, napi_default, NULL},
    {"ofdLock", NULL, ofd_lock, NULL, NULL, NULL, napi_default, NULL},
    {"ofdHeld", NULL, ofd_held, NULL, NULL, NULL, napi_default, NULL},
    {"copyRange", NULL, copy_range, NULL, NULL, NULL, napi_default, NULL},
    {"writeBehind", NULL, write_behind, NULL, NULL, NULL, napi_default, NULL},
    {"zstdCompress", NULL, zstd_compress_js, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof d / sizeof d[0], d);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)

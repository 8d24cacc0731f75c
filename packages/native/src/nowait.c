// preadv2/pwritev2 with RWF_NOWAIT: a read or write that the page cache can serve now, or
// -EAGAIN at once where it would wait (a page not cached, dirty-page throttling, a lock).
// Lets a caller do small cached I/O on its own thread and send only the rest to a threadpool,
// without guessing from timings. Returns bytes moved (>= 0) or -errno; never throws for I/O.
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>
#include <node_api.h>

#include "args.h"

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

// (fd, typedArray, offset, length, position)
static napi_value io(napi_env env, napi_callback_info info, int write) {
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd;
  char *ptr;
  size_t length;
  int64_t position;
  if (argc != 5 || fd_range_args(env, argv, &fd, &ptr, &length, &position) != 0) {
    napi_throw_type_error(env, "EINVAL", write ? "pwriteNowait(fd, uint8array, offset, length, position): bad arguments" : "preadNowait(fd, uint8array, offset, length, position): bad arguments");
    return NULL;
  }
  struct iovec iov = { ptr, length };
  ssize_t r = write ? pwritev2(fd, &iov, 1, (off_t)position, RWF_NOWAIT) : preadv2(fd, &iov, 1, (off_t)position, RWF_NOWAIT);
  napi_value out;
  napi_create_int64(env, r < 0 ? -(int64_t)errno : (int64_t)r, &out);
  return out;
}

static napi_value pread_nowait(napi_env env, napi_callback_info info) { return io(env, info, 0); }
static napi_value pwrite_nowait(napi_env env, napi_callback_info info) { return io(env, info, 1); }

napi_value nowait_init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "preadNowait", NAPI_AUTO_LENGTH, pread_nowait, NULL, &fn);
  napi_set_named_property(env, exports, "preadNowait", fn);
  napi_create_function(env, "pwriteNowait", NAPI_AUTO_LENGTH, pwrite_nowait, NULL, &fn);
  napi_set_named_property(env, exports, "pwriteNowait", fn);
  return exports;
}

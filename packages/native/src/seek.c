// lseek(SEEK_DATA / SEEK_HOLE) for Node.js, which has no lseek at all. Synchronous: the call
// asks the filesystem's extent map (no data is read), a few microseconds.
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>

#include "aio.h"
#include "batch.h"

// Throws an Error with `code` set to the errno's name, as Node's fs does (ENXIO is not an
// error here: the callers turn it into -1).
static void throw_errno(napi_env env, int err, const char *syscall) {
  const char *name;
  switch (err) {
    case EBADF: name = "EBADF"; break;
    case EINVAL: name = "EINVAL"; break;
    case EOVERFLOW: name = "EOVERFLOW"; break;
    case ESPIPE: name = "ESPIPE"; break;
    case EIO: name = "EIO"; break;
    default: name = "EUNKNOWN"; break;
  }
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s, %s", name, strerror(err), syscall);
  napi_throw_error(env, name, msg);
}

// seek(fd, offset, whence): whence 0 = SEEK_DATA, 1 = SEEK_HOLE. Returns the offset found, or
// -1 when lseek says ENXIO (no data at or after offset, or offset at or past the end).
static napi_value seek(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3) {
    napi_throw_type_error(env, "EINVAL", "seek(fd, offset, whence) takes three numbers");
    return NULL;
  }
  int32_t fd, which;
  int64_t offset;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int32(env, argv[2], &which) != napi_ok || offset < 0 || (which != 0 && which != 1)) {
    napi_throw_type_error(env, "EINVAL", "seek(fd, offset, whence): fd and offset >= 0 integers, whence 0 (data) or 1 (hole)");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, which == 0 ? SEEK_DATA : SEEK_HOLE);
  if (r < 0) {
    if (errno != ENXIO) {
      throw_errno(env, errno, which == 0 ? "lseek SEEK_DATA" : "lseek SEEK_HOLE");
      return NULL;
    }
    r = -1;
  }
  napi_value out;
  napi_create_int64(env, (int64_t)r, &out);
  return out;
}

napi_value nowait_init(napi_env env, napi_value exports);

static napi_value init(napi_env env, napi_value exports) {
  nowait_init(env, exports);
  napi_value fn;
  napi_create_function(env, "seek", NAPI_AUTO_LENGTH, seek, NULL, &fn);
  napi_set_named_property(env, exports, "seek", fn);
  batch_register(env, exports);
  return aio_register(env, exports);
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)

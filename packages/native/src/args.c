// Arguments the addon's functions share: a file range of a Uint8Array (nowait.c, batch.c).
#include "args.h"

int fd_range_args(napi_env env, const napi_value *argv, int32_t *fd, char **ptr, size_t *length, int64_t *position) {
  int64_t offset = -1, len = -1, pos = -1;
  void *data = NULL;
  size_t bytes = 0;
  bool is_ta = false;
  napi_typedarray_type type;
  if (napi_get_value_int32(env, argv[0], fd) != napi_ok || napi_is_typedarray(env, argv[1], &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, argv[1], &type, &bytes, &data, NULL, NULL) != napi_ok || type != napi_uint8_array ||
      napi_get_value_int64(env, argv[2], &offset) != napi_ok || napi_get_value_int64(env, argv[3], &len) != napi_ok ||
      napi_get_value_int64(env, argv[4], &pos) != napi_ok || offset < 0 || len < 0 || pos < 0 || (uint64_t)offset + (uint64_t)len > bytes) {
    return -1;
  }
  *ptr = (char *)data + offset;
  *length = (size_t)len;
  *position = pos;
  return 0;
}

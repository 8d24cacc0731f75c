// Arguments the addon's functions share (args.c).
#ifndef BLKFILTER_ARGS_H
#define BLKFILTER_ARGS_H
#include <stddef.h>
#include <stdint.h>
#include <node_api.h>

// Reads (fd, uint8array, offset, length, position) from argv[0..4]: the fd, the address of
// byte `offset` of the array, `length` and `position`. 0 when every one is valid (the range
// inside the array; offset, length and position not negative; the fd is not checked), -1
// otherwise; throws nothing.
int fd_range_args(napi_env env, const napi_value *argv, int32_t *fd, char **ptr, size_t *length, int64_t *position);

#endif

// Linux native AIO for O_DIRECT files (aio.c): adds its functions to the addon's exports.
#ifndef BLKFILTER_AIO_H
#define BLKFILTER_AIO_H
#include <node_api.h>

napi_value aio_register(napi_env env, napi_value exports);

#endif

// Batches of pwrite run in order by one threadpool thread (batch.c): adds its functions to the addon's exports.
#ifndef BLKFILTER_BATCH_H
#define BLKFILTER_BATCH_H
#include <node_api.h>

napi_value batch_register(napi_env env, napi_value exports);

#endif

// Batches of pwrite(2) run in order by one threadpool thread, one batch at a time, completed on
// the JavaScript thread with one call per batch. ext4 and XFS let one buffered write of a file
// run at a time (the inode lock): several threadpool threads writing one file mostly wait for
// each other, each wait a sleep and a wakeup, and every write pays its own hand-off to a thread
// and back. A batch pays one hand-off for all the writes that queued while the last one ran.
//
// Ownership. The caller adds writes (fd, buffer range, position) and submits them; it keeps the
// buffers referenced until the batch completes (the thread reads them until then) and adds
// nothing while a batch runs. Results are written to a Float64Array the batch owns (bytes
// written, or -errno, per write in the order added) before the callback runs. The callback is
// held by a strong reference until close; close is refused while a batch runs.
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "args.h"
#include "batch.h"

// The most writes one batch may hold.
#define MAX_CAPACITY 65536

typedef struct {
  int fd;
  const char *ptr;
  size_t len;
  int64_t pos;
} entry_t;

typedef struct {
  napi_env env;
  napi_async_work work;
  napi_ref callback_ref;
  napi_ref results_ref;
  double *results;
  entry_t *ents;
  uint32_t capacity;
  // Writes added to the batch being built, or held by the batch that runs.
  uint32_t count;
  int busy;
  int closed;
  // The external naming this batch was collected: free once closed too.
  int finalized;
} batch_t;

static void batch_free(batch_t *b) {
  free(b->ents);
  free(b);
}

static void execute(napi_env env, void *data) {
  (void)env;
  batch_t *b = data;
  for (uint32_t i = 0; i < b->count; i++) {
    entry_t *e = &b->ents[i];
    ssize_t r;
    do {
      r = pwrite(e->fd, e->ptr, e->len, (off_t)e->pos);
    } while (r < 0 && errno == EINTR);
    b->results[i] = r < 0 ? -(double)errno : (double)r;
  }
}

static void shut(napi_env env, batch_t *b) {
  b->closed = 1;
  napi_delete_async_work(env, b->work);
  napi_delete_reference(env, b->callback_ref);
  napi_delete_reference(env, b->results_ref);
}

static void complete(napi_env env, napi_status status, void *data) {
  batch_t *b = data;
  uint32_t count = b->count;
  b->count = 0;
  b->busy = 0;
  if (b->finalized) {
    // Nobody holds the batch any more: nothing to tell.
    shut(env, b);
    batch_free(b);
    return;
  }
  if (status != napi_ok) {
    // Cancelled (never the case: nothing cancels it): every write failed with ECANCELED.
    for (uint32_t i = 0; i < count; i++) b->results[i] = -(double)ECANCELED;
  }
  napi_value cb, recv, argv[1];
  if (napi_get_reference_value(env, b->callback_ref, &cb) != napi_ok || cb == NULL) return;
  napi_get_undefined(env, &recv);
  napi_create_uint32(env, count, &argv[0]);
  // A throwing callback is reported as uncaught by Node; the batch is already idle again.
  napi_call_function(env, recv, cb, 1, argv, NULL);
}

// The external was collected. Never closed: close now, or once the running batch completes.
static void finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  batch_t *b = data;
  b->finalized = 1;
  if (b->busy) return;
  if (!b->closed) shut(env, b);
  batch_free(b);
}

static batch_t *unwrap(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok) return NULL;
  return p;
}

// (capacity, callback) -> [external, Float64Array results]
static napi_value batch_open(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t capacity = 0;
  napi_valuetype t;
  if (argc != 2 || napi_get_value_uint32(env, argv[0], &capacity) != napi_ok || capacity < 1 || capacity > MAX_CAPACITY ||
      napi_typeof(env, argv[1], &t) != napi_ok || t != napi_function) {
    napi_throw_type_error(env, "EINVAL", "batchOpen(capacity 1..65536, callback)");
    return NULL;
  }
  batch_t *b = calloc(1, sizeof *b);
  entry_t *ents = calloc(capacity, sizeof *ents);
  if (b == NULL || ents == NULL) {
    free(b);
    free(ents);
    napi_throw_error(env, "ENOMEM", "batchOpen: out of memory");
    return NULL;
  }
  b->env = env;
  b->ents = ents;
  b->capacity = capacity;
  napi_value ab, results, name, ext, out;
  void *mem = NULL;
  napi_create_arraybuffer(env, (size_t)capacity * sizeof(double), &mem, &ab);
  b->results = mem;
  napi_create_typedarray(env, napi_float64_array, capacity, ab, 0, &results);
  napi_create_reference(env, results, 1, &b->results_ref);
  napi_create_reference(env, argv[1], 1, &b->callback_ref);
  napi_create_string_utf8(env, "blkfilter:pwriteBatch", NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, execute, complete, b, &b->work) != napi_ok) {
    napi_delete_reference(env, b->results_ref);
    napi_delete_reference(env, b->callback_ref);
    batch_free(b);
    napi_throw_error(env, "EIO", "batchOpen: napi_create_async_work failed");
    return NULL;
  }
  napi_create_external(env, b, finalize, NULL, &ext);
  napi_create_array_with_length(env, 2, &out);
  napi_set_element(env, out, 0, ext);
  napi_set_element(env, out, 1, results);
  return out;
}

// (external, fd, uint8array, offset, length, position) -> index in the batch
static napi_value batch_add(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  batch_t *b = argc == 6 ? unwrap(env, argv[0]) : NULL;
  int32_t fd;
  char *ptr;
  size_t length;
  int64_t position;
  if (b == NULL || fd_range_args(env, argv + 1, &fd, &ptr, &length, &position) != 0 || fd < 0) {
    napi_throw_type_error(env, "EINVAL", "batchAdd(batch, fd, uint8array, offset, length, position): bad arguments");
    return NULL;
  }
  if (b->closed || b->busy || b->count >= b->capacity) {
    napi_throw_error(env, "EBUSY", b->closed ? "batchAdd: the batch is closed" : b->busy ? "batchAdd: a batch is running" : "batchAdd: the batch is full");
    return NULL;
  }
  entry_t *e = &b->ents[b->count];
  e->fd = fd;
  e->ptr = ptr;
  e->len = length;
  e->pos = position;
  napi_value out;
  napi_create_uint32(env, b->count++, &out);
  return out;
}

// The batch that is a function's only argument, or NULL with a TypeError thrown.
static batch_t *only_arg(napi_env env, napi_callback_info info, const char *usage) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  batch_t *b = argc == 1 ? unwrap(env, argv[0]) : NULL;
  if (b == NULL) napi_throw_type_error(env, "EINVAL", usage);
  return b;
}

// (external) -> the number of writes submitted
static napi_value batch_submit(napi_env env, napi_callback_info info) {
  batch_t *b = only_arg(env, info, "batchSubmit(batch)");
  if (b == NULL) return NULL;
  if (b->closed || b->busy || b->count == 0) {
    napi_throw_error(env, "EBUSY", b->closed ? "batchSubmit: the batch is closed" : b->busy ? "batchSubmit: a batch is running" : "batchSubmit: nothing was added");
    return NULL;
  }
  if (napi_queue_async_work(env, b->work) != napi_ok) {
    napi_throw_error(env, "EIO", "batchSubmit: napi_queue_async_work failed");
    return NULL;
  }
  b->busy = 1;
  napi_value out;
  napi_create_uint32(env, b->count, &out);
  return out;
}

// (external) -> undefined; refused while a batch runs
static napi_value batch_close(napi_env env, napi_callback_info info) {
  batch_t *b = only_arg(env, info, "batchClose(batch)");
  if (b == NULL) return NULL;
  if (b->busy) {
    napi_throw_error(env, "EBUSY", "batchClose: a batch is running");
    return NULL;
  }
  if (!b->closed) shut(env, b);
  return NULL;
}

napi_value batch_register(napi_env env, napi_value exports) {
  static const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"batchOpen", batch_open},
      {"batchAdd", batch_add},
      {"batchSubmit", batch_submit},
      {"batchClose", batch_close},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value fn;
    napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &fn);
    napi_set_named_property(env, exports, fns[i].name, fn);
  }
  return exports;
}

// Linux native AIO (io_setup/io_submit/io_getevents/io_destroy through syscall(2), no libaio)
// for files opened with O_DIRECT, completed on the JavaScript thread with no thread hop: every
// iocb carries IOCB_FLAG_RESFD, so the kernel bumps an eventfd when it completes, and libuv
// watches that eventfd (uv_poll_t on the environment's loop). One wakeup reaps every completion
// there is and hands them to JavaScript in one call, as (id, result) pairs in an Int32Array the
// caller gave us: no closure, promise or call per request.
//
// Ownership. A context has `depth` slots; the caller names a request by its slot (id), and
// keeps the request's buffers referenced until its completion arrives (the kernel writes into
// them until then). A context is closed only when nothing is in flight (aioClose refuses
// otherwise): so io_destroy never has to cancel, and no completion is lost. The callback is held
// by a strong reference until close, so whatever it reaches (the caller's requests and their
// buffers) cannot be collected while the kernel may still touch it. The C state is freed when
// both the uv_poll_t has closed and the external that names it has been collected, in whichever
// order those happen.
//
// Buffered I/O is synchronous under Linux AIO (io_submit does the copy itself): use this for
// O_DIRECT files only.
#define _GNU_SOURCE
#include <errno.h>
#include <linux/aio_abi.h>
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "aio.h"

#define OP_READ 0
#define OP_WRITE 1
#define OP_FDSYNC 2

// The most slots a context may have (the kernel refuses more than fs.aio-max-nr anyway).
#define MAX_DEPTH (1 << 20)
// The most buffers one vectored request may have (the kernel's UIO_MAXIOV).
#define MAX_IOV 1024

enum { ST_OPEN, ST_CLOSING, ST_CLOSED };

typedef struct {
  napi_env env;
  aio_context_t ctx;
  int efd;
  int state;
  // The external naming this context was collected (free once closed too).
  int finalized;
  // The poll handle holds the loop open: only while something is in flight.
  int refd;
  uint32_t depth;
  uv_poll_t poll;
  // Per slot: the iocb, whether it is taken (queued, in the kernel or failed), its iovec array.
  struct iocb *iocbs;
  uint8_t *busy;
  struct iovec **iovs;
  uint32_t *iovcap;
  // Queued iocbs not yet given to io_submit, in order.
  struct iocb **queue;
  uint32_t nqueued;
  // In the kernel (submitted, not reaped).
  uint32_t inflight;
  // Refused by io_submit: delivered as completions with -errno on the next wakeup.
  int32_t *failed;
  uint32_t nfailed;
  struct io_event *events;
  // (id, result) pairs for JavaScript: the caller's Int32Array, 2 * depth long.
  int32_t *results;
  napi_ref results_ref;
  napi_ref callback_ref;
  napi_async_context async_ctx;
  napi_async_cleanup_hook_handle cleanup;
  // Closing: the parts still to finish (poll handle close, io_destroy), and who to tell.
  int closing_parts;
  uv_work_t work;
  napi_ref done_ref;
  // Counters for stats: io_submit calls, wakeups that reaped something, EAGAIN refusals.
  double submits;
  double wakeups;
  double eagains;
} aio_t;

static long sys_io_setup(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static long sys_io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
static long sys_io_submit(aio_context_t ctx, long n, struct iocb **iocbs) { return syscall(SYS_io_submit, ctx, n, iocbs); }
static long sys_io_getevents(aio_context_t ctx, long min_nr, long nr, struct io_event *events, struct timespec *timeout) {
  return syscall(SYS_io_getevents, ctx, min_nr, nr, events, timeout);
}

// Throws an Error whose `code` is the errno's name and `errno` its number, as Node's fs does.
static void throw_errno(napi_env env, int err, const char *what) {
  const char *name = strerrorname_np(err);
  if (name == NULL) name = "EUNKNOWN";
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s, %s", name, strerror(err), what);
  napi_value code, message, error, num;
  if (napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message) != napi_ok || napi_create_error(env, code, message, &error) != napi_ok) {
    napi_throw_error(env, name, msg);
    return;
  }
  napi_create_int32(env, err, &num);
  napi_set_named_property(env, error, "errno", num);
  napi_throw(env, error);
}

static void free_aio(aio_t *a) {
  if (a->iovs != NULL) {
    for (uint32_t i = 0; i < a->depth; i++) free(a->iovs[i]);
  }
  free(a->iovs);
  free(a->iovcap);
  free(a->iocbs);
  free(a->busy);
  free(a->queue);
  free(a->failed);
  free(a->events);
  free(a);
}

static void update_ref(aio_t *a) {
  int want = a->inflight + a->nqueued + a->nfailed > 0;
  if (want && !a->refd) uv_ref((uv_handle_t *)&a->poll);
  else if (!want && a->refd) uv_unref((uv_handle_t *)&a->poll);
  a->refd = want;
}

// Wakes the poll handle, so that failed submissions are delivered like completions (never from
// inside the call that queued them).
static void kick(aio_t *a) {
  uint64_t one = 1;
  ssize_t w = write(a->efd, &one, sizeof one);
  (void)w;  // EAGAIN only when the counter is about to overflow: it is then readable anyway.
}

// Gives the queued iocbs to the kernel. An iocb the kernel refuses (a bad fd, EINVAL) becomes a
// failed completion; EAGAIN with requests in flight keeps the rest queued until a completion
// frees room (submit_queued runs again after each reap), EAGAIN with nothing in flight fails
// them with EAGAIN, since nothing would ever free room.
static void submit_queued(aio_t *a) {
  uint32_t done = 0;
  int kicked = 0;
  while (done < a->nqueued) {
    a->submits++;
    long r = sys_io_submit(a->ctx, (long)(a->nqueued - done), a->queue + done);
    if (r > 0) {
      done += (uint32_t)r;
      a->inflight += (uint32_t)r;
      continue;
    }
    int err = r == 0 ? EAGAIN : errno;
    if (err == EINTR) continue;
    if (err == EAGAIN) {
      a->eagains++;
      if (a->inflight > 0) break;
    }
    struct iocb *cb = a->queue[done++];
    a->failed[2 * a->nfailed] = (int32_t)cb->aio_data;
    a->failed[2 * a->nfailed + 1] = -err;
    a->nfailed++;
    if (!kicked) {
      kick(a);
      kicked = 1;
    }
  }
  if (done > 0) {
    memmove(a->queue, a->queue + done, (a->nqueued - done) * sizeof *a->queue);
    a->nqueued -= done;
  }
  update_ref(a);
}

// Calls the JavaScript callback with `n` pairs in `results`. An exception from it is reported
// as uncaught (it reaches process 'uncaughtException', as from any I/O callback) and the
// callback is called again with the same count: the caller keeps a cursor, so the completions
// after the one that threw are still delivered, each once.
static void deliver(aio_t *a, uint32_t n) {
  napi_env env = a->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv, argv[1];
  napi_get_reference_value(env, a->callback_ref, &cb);
  // napi_make_callback wants an object for `this`.
  napi_get_global(env, &recv);
  napi_create_uint32(env, n, &argv[0]);
  for (uint32_t attempt = 0; attempt <= n && a->state == ST_OPEN; attempt++) {
    napi_status st = napi_make_callback(env, a->async_ctx, recv, cb, 1, argv, NULL);
    if (st != napi_pending_exception) break;
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
  napi_close_handle_scope(env, scope);
}

static void on_poll(uv_poll_t *handle, int status, int events) {
  (void)events;
  aio_t *a = (aio_t *)handle->data;
  if (a->state != ST_OPEN || status < 0) return;
  uint64_t count;
  // Reset the eventfd before reaping: a completion after this read bumps it again, so nothing
  // is missed; one reaped here whose bump comes later costs a wakeup that finds nothing.
  ssize_t rd = read(a->efd, &count, sizeof count);
  (void)rd;
  uint32_t n = 0;
  for (uint32_t i = 0; i < a->nfailed; i++, n++) {
    a->results[2 * n] = a->failed[2 * i];
    a->results[2 * n + 1] = a->failed[2 * i + 1];
  }
  a->nfailed = 0;
  while (a->inflight > 0) {
    struct timespec zero = {0, 0};
    long r = sys_io_getevents(a->ctx, 0, (long)a->inflight, a->events, &zero);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    for (long i = 0; i < r; i++, n++) {
      a->results[2 * n] = (int32_t)a->events[i].data;
      // res is a byte count (at most 2^31 - 4096 per call on Linux) or -errno.
      a->results[2 * n + 1] = (int32_t)a->events[i].res;
    }
    a->inflight -= (uint32_t)r;
  }
  if (n == 0) return;
  a->wakeups++;
  for (uint32_t i = 0; i < n; i++) a->busy[a->results[2 * i]] = 0;
  // Reaping made room in the ring: iocbs held back by EAGAIN go now.
  if (a->nqueued > 0) submit_queued(a);
  else update_ref(a);
  deliver(a, n);
}

static void release_js(aio_t *a) {
  if (a->callback_ref != NULL) napi_delete_reference(a->env, a->callback_ref);
  if (a->results_ref != NULL) napi_delete_reference(a->env, a->results_ref);
  if (a->done_ref != NULL) napi_delete_reference(a->env, a->done_ref);
  if (a->async_ctx != NULL) napi_async_destroy(a->env, a->async_ctx);
  a->callback_ref = NULL;
  a->results_ref = NULL;
  a->done_ref = NULL;
  a->async_ctx = NULL;
}

// Both halves of a close are done (the poll handle closed, the context destroyed): tell the
// caller, let the environment's teardown go on if it waits for us, free once collected too.
static void close_part_done(aio_t *a) {
  if (--a->closing_parts > 0) return;
  a->state = ST_CLOSED;
  if (a->done_ref != NULL && a->async_ctx != NULL) {
    napi_handle_scope scope;
    if (napi_open_handle_scope(a->env, &scope) == napi_ok) {
      napi_value done, recv;
      napi_get_reference_value(a->env, a->done_ref, &done);
      napi_get_global(a->env, &recv);
      if (napi_make_callback(a->env, a->async_ctx, recv, done, 0, NULL, NULL) == napi_pending_exception) {
        napi_value err;
        napi_get_and_clear_last_exception(a->env, &err);
        napi_fatal_exception(a->env, err);
      }
      napi_close_handle_scope(a->env, scope);
    }
  }
  release_js(a);
  if (a->cleanup != NULL) {
    napi_async_cleanup_hook_handle h = a->cleanup;
    a->cleanup = NULL;
    napi_remove_async_cleanup_hook(h);
  }
  if (a->finalized) free_aio(a);
}

static void on_closed(uv_handle_t *handle) {
  aio_t *a = (aio_t *)handle->data;
  close(a->efd);
  a->efd = -1;
  close_part_done(a);
}

// io_destroy waits for an RCU grace period (25-35 ms measured here) even with nothing in
// flight: off the event loop, on the threadpool.
static void destroy_work(uv_work_t *req) {
  aio_t *a = (aio_t *)req->data;
  sys_io_destroy(a->ctx);
}

static void destroy_done(uv_work_t *req, int status) {
  (void)status;
  close_part_done((aio_t *)req->data);
}

// Stops everything. With `wait`, io_destroy runs here and waits for requests still in the
// kernel (at teardown, or when an open context was collected), so no buffer is written after
// this returns; else (an idle context, closed by its owner) it runs on the threadpool.
static void shut(aio_t *a, bool wait) {
  a->state = ST_CLOSING;
  uv_poll_stop(&a->poll);
  a->closing_parts = 2;
  a->work.data = a;
  uv_loop_t *loop = uv_handle_get_loop((uv_handle_t *)&a->poll);
  if (wait || uv_queue_work(loop, &a->work, destroy_work, destroy_done) != 0) {
    sys_io_destroy(a->ctx);
    a->closing_parts = 1;
  }
  uv_close((uv_handle_t *)&a->poll, on_closed);
}

// The environment is going away (a worker ends, or the process exits) with the context open:
// stop the kernel now. A close already under way removes the hook when it is done.
static void on_teardown(napi_async_cleanup_hook_handle handle, void *arg) {
  aio_t *a = (aio_t *)arg;
  (void)handle;
  if (a->state == ST_OPEN) shut(a, true);
}

static void on_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  aio_t *a = (aio_t *)data;
  a->finalized = 1;
  if (a->state == ST_OPEN) {
    // Collected without aioClose: nothing can reach its callback's caller any more; only the
    // kernel must be stopped from writing.
    release_js(a);
    shut(a, true);
  } else if (a->state == ST_CLOSED) {
    free_aio(a);
  }
}

// The context named by `v`, open or closed; NULL after throwing `usage` when `v` names none.
static aio_t *get_ctx(napi_env env, napi_value v, const char *usage) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, "EINVAL", usage);
    return NULL;
  }
  return (aio_t *)p;
}

// The open context named by `v`; NULL after throwing when it names none or a closed one.
static aio_t *get_aio(napi_env env, napi_value v) {
  aio_t *a = get_ctx(env, v, "not an AIO context");
  if (a != NULL && a->state != ST_OPEN) {
    napi_throw_error(env, "EBADF", "the AIO context is closed");
    return NULL;
  }
  return a;
}

// Fetches up to `n` arguments (missing ones NULL) and the context named by the first: open
// only when `open`. NULL after throwing when the arguments do not name one.
static aio_t *ctx_args(napi_env env, napi_callback_info info, napi_value *argv, size_t n, bool open, size_t *argc, const char *usage) {
  *argc = n;
  for (size_t i = 0; i < n; i++) argv[i] = NULL;
  napi_get_cb_info(env, info, argc, argv, NULL, NULL);
  return open ? get_aio(env, argv[0]) : get_ctx(env, argv[0], usage);
}

// aioOpen(depth, kernelEvents, callback, results: Int32Array(2 * depth)) -> external
static napi_value aio_open(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t depth = 0, kernel_events = 0;
  napi_valuetype cbtype = napi_undefined;
  bool is_ta = false;
  if (argc != 4 || napi_get_value_int32(env, argv[0], &depth) != napi_ok || napi_get_value_int32(env, argv[1], &kernel_events) != napi_ok ||
      napi_typeof(env, argv[2], &cbtype) != napi_ok || cbtype != napi_function || napi_is_typedarray(env, argv[3], &is_ta) != napi_ok || !is_ta ||
      depth < 1 || depth > MAX_DEPTH || kernel_events < 1) {
    napi_throw_type_error(env, "EINVAL", "aioOpen(depth 1..2^20, kernelEvents >= 1, callback, results: Int32Array(2 * depth))");
    return NULL;
  }
  napi_typedarray_type tatype;
  size_t talen;
  void *tadata;
  if (napi_get_typedarray_info(env, argv[3], &tatype, &talen, &tadata, NULL, NULL) != napi_ok || tatype != napi_int32_array ||
      talen < 2 * (size_t)depth) {
    napi_throw_type_error(env, "EINVAL", "aioOpen: results must be an Int32Array of at least 2 * depth elements");
    return NULL;
  }
  aio_context_t ctx = 0;
  if (sys_io_setup((unsigned)kernel_events, &ctx) < 0) {
    throw_errno(env, errno, "io_setup");
    return NULL;
  }
  int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (efd < 0) {
    int err = errno;
    sys_io_destroy(ctx);
    throw_errno(env, err, "eventfd");
    return NULL;
  }
  aio_t *a = (aio_t *)calloc(1, sizeof *a);
  if (a != NULL) {
    a->iocbs = (struct iocb *)calloc((size_t)depth, sizeof *a->iocbs);
    a->busy = (uint8_t *)calloc((size_t)depth, 1);
    a->iovs = (struct iovec **)calloc((size_t)depth, sizeof *a->iovs);
    a->iovcap = (uint32_t *)calloc((size_t)depth, sizeof *a->iovcap);
    a->queue = (struct iocb **)calloc((size_t)depth, sizeof *a->queue);
    a->failed = (int32_t *)calloc(2 * (size_t)depth, sizeof *a->failed);
    a->events = (struct io_event *)calloc((size_t)depth, sizeof *a->events);
  }
  if (a == NULL || a->iocbs == NULL || a->busy == NULL || a->iovs == NULL || a->iovcap == NULL || a->queue == NULL || a->failed == NULL ||
      a->events == NULL) {
    if (a != NULL) free_aio(a);
    sys_io_destroy(ctx);
    close(efd);
    throw_errno(env, ENOMEM, "aioOpen");
    return NULL;
  }
  a->env = env;
  a->ctx = ctx;
  a->efd = efd;
  a->depth = (uint32_t)depth;
  a->results = (int32_t *)tadata;
  a->state = ST_OPEN;
  uv_loop_t *loop = NULL;
  int uverr = 0;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == NULL || (uverr = uv_poll_init(loop, &a->poll, efd)) != 0) {
    free_aio(a);
    sys_io_destroy(ctx);
    close(efd);
    if (uverr != 0) throw_errno(env, -uverr, "uv_poll_init");
    else napi_throw_error(env, "EINVAL", "aioOpen: no libuv loop in this environment");
    return NULL;
  }
  a->poll.data = a;
  // From here the handle exists: failures close it (on_closed frees once finalized is set).
  napi_value name, ext;
  napi_create_string_utf8(env, "blkfilter:aio", NAPI_AUTO_LENGTH, &name);
  if (napi_create_reference(env, argv[2], 1, &a->callback_ref) != napi_ok || napi_create_reference(env, argv[3], 1, &a->results_ref) != napi_ok ||
      napi_async_init(env, NULL, name, &a->async_ctx) != napi_ok || napi_create_external(env, a, on_finalize, NULL, &ext) != napi_ok) {
    a->finalized = 1;
    release_js(a);
    shut(a, true);
    napi_throw_error(env, "ENOMEM", "aioOpen: could not create its JavaScript handles");
    return NULL;
  }
  uv_poll_start(&a->poll, UV_READABLE, on_poll);
  uv_unref((uv_handle_t *)&a->poll);
  napi_add_async_cleanup_hook(env, on_teardown, a, &a->cleanup);
  return ext;
}

// Takes slot `id` for a new request, or throws: a slot is the caller's to manage, and reusing
// one still in flight would lose a completion.
static struct iocb *take_slot(napi_env env, aio_t *a, int32_t id) {
  if (id < 0 || (uint32_t)id >= a->depth) {
    napi_throw_range_error(env, "EINVAL", "AIO request id out of range");
    return NULL;
  }
  if (a->busy[id]) {
    napi_throw_error(env, "EBUSY", "AIO request id still in flight");
    return NULL;
  }
  struct iocb *cb = &a->iocbs[id];
  memset(cb, 0, sizeof *cb);
  cb->aio_data = (uint64_t)id;
  cb->aio_flags = IOCB_FLAG_RESFD;
  cb->aio_resfd = (uint32_t)a->efd;
  return cb;
}

static void enqueue(aio_t *a, struct iocb *cb, int32_t id, bool flush) {
  a->busy[id] = 1;
  a->queue[a->nqueued++] = cb;
  if (flush) submit_queued(a);
  else update_ref(a);
}

// The bytes [offset, offset + length) of a typed array (or Buffer, or DataView) argument.
static bool get_bytes(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  bool is_ta = false;
  void *p = NULL;
  if (napi_is_typedarray(env, v, &is_ta) == napi_ok && is_ta) {
    napi_typedarray_type type;
    size_t n;
    if (napi_get_typedarray_info(env, v, &type, &n, &p, NULL, NULL) != napi_ok) return false;
    size_t elem = 1;
    switch (type) {
      case napi_int16_array:
      case napi_uint16_array:
        elem = 2;
        break;
      case napi_int32_array:
      case napi_uint32_array:
      case napi_float32_array:
        elem = 4;
        break;
      case napi_float64_array:
      case napi_bigint64_array:
      case napi_biguint64_array:
        elem = 8;
        break;
      default:
        break;
    }
    *data = (uint8_t *)p;
    *len = n * elem;
    return true;
  }
  bool is_dv = false;
  if (napi_is_dataview(env, v, &is_dv) == napi_ok && is_dv) {
    if (napi_get_dataview_info(env, v, len, &p, NULL, NULL) != napi_ok) return false;
    *data = (uint8_t *)p;
    return true;
  }
  return false;
}

// Points slot `id`'s iovec array at `buffers` (1 to MAX_IOV typed arrays, each whole); the
// kernel copies the array at io_submit, the memory it points to it uses until completion.
static struct iovec *fill_iov(napi_env env, aio_t *a, int32_t id, napi_value buffers, uint32_t *count) {
  bool is_array = false;
  uint32_t n = 0;
  if (napi_is_array(env, buffers, &is_array) != napi_ok || !is_array || napi_get_array_length(env, buffers, &n) != napi_ok || n < 1 || n > MAX_IOV) {
    napi_throw_type_error(env, "EINVAL", "aioQueue: buffers must be an array of 1 to 1024 typed arrays");
    return NULL;
  }
  if (a->iovcap[id] < n) {
    struct iovec *grown = (struct iovec *)realloc(a->iovs[id], n * sizeof *grown);
    if (grown == NULL) {
      throw_errno(env, ENOMEM, "aioQueue");
      return NULL;
    }
    a->iovs[id] = grown;
    a->iovcap[id] = n;
  }
  struct iovec *iov = a->iovs[id];
  for (uint32_t i = 0; i < n; i++) {
    napi_value el;
    uint8_t *data;
    size_t size;
    if (napi_get_element(env, buffers, i, &el) != napi_ok || !get_bytes(env, el, &data, &size)) {
      napi_throw_type_error(env, "EINVAL", "aioQueue: every buffer must be a typed array or DataView");
      return NULL;
    }
    iov[i].iov_base = data;
    iov[i].iov_len = size;
  }
  *count = n;
  return iov;
}

// aioQueue(ctx, id, op, fd, buffers, bufferOffset, length, position, flush): queues request
// `id` and, with `flush`, submits everything queued. op 0 read, 1 write: `buffers` one typed
// array (bufferOffset and length inside it: pread/pwrite) or an array of them (whole:
// preadv/pwritev, bufferOffset and length ignored); op 2 fdatasync (IOCB_CMD_FDSYNC, Linux
// 4.18+; older kernels fail it with EINVAL), buffers and the rest ignored.
static napi_value aio_queue(napi_env env, napi_callback_info info) {
  size_t argc;
  napi_value argv[9];
  aio_t *a = ctx_args(env, info, argv, 9, true, &argc, NULL);
  if (a == NULL) return NULL;
  if (argc != 9) {
    napi_throw_type_error(env, "EINVAL", "aioQueue(ctx, id, op, fd, buffers, bufferOffset, length, position, flush)");
    return NULL;
  }
  int32_t id, op, fd;
  int64_t boff = 0, len = 0, pos = 0;
  bool flush;
  if (napi_get_value_int32(env, argv[1], &id) != napi_ok || napi_get_value_int32(env, argv[2], &op) != napi_ok ||
      napi_get_value_int32(env, argv[3], &fd) != napi_ok || napi_get_value_bool(env, argv[8], &flush) != napi_ok ||
      (op != OP_READ && op != OP_WRITE && op != OP_FDSYNC) ||
      (op != OP_FDSYNC && (napi_get_value_int64(env, argv[7], &pos) != napi_ok || pos < 0))) {
    napi_throw_type_error(env, "EINVAL", "aioQueue: bad arguments (id, op 0 to 2, fd and position >= 0)");
    return NULL;
  }
  struct iocb *cb = take_slot(env, a, id);
  if (cb == NULL) return NULL;
  cb->aio_fildes = (uint32_t)fd;
  cb->aio_offset = pos;
  if (op == OP_FDSYNC) {
    cb->aio_lio_opcode = IOCB_CMD_FDSYNC;
  } else {
    uint8_t *data;
    size_t size;
    bool is_array = false;
    napi_is_array(env, argv[4], &is_array);
    if (is_array) {
      uint32_t n = 0;
      struct iovec *iov = fill_iov(env, a, id, argv[4], &n);
      if (iov == NULL) return NULL;
      cb->aio_lio_opcode = op == OP_READ ? IOCB_CMD_PREADV : IOCB_CMD_PWRITEV;
      cb->aio_buf = (uint64_t)(uintptr_t)iov;
      cb->aio_nbytes = n;
    } else if (get_bytes(env, argv[4], &data, &size) && napi_get_value_int64(env, argv[5], &boff) == napi_ok &&
               napi_get_value_int64(env, argv[6], &len) == napi_ok && boff >= 0 && len >= 0 && (uint64_t)boff <= size &&
               (uint64_t)len <= size - (uint64_t)boff) {
      cb->aio_lio_opcode = op == OP_READ ? IOCB_CMD_PREAD : IOCB_CMD_PWRITE;
      cb->aio_buf = (uint64_t)(uintptr_t)(data + boff);
      cb->aio_nbytes = (uint64_t)len;
    } else {
      napi_throw_type_error(env, "EINVAL", "aioQueue: a typed array, with bufferOffset and length inside it");
      return NULL;
    }
  }
  enqueue(a, cb, id, flush);
  return NULL;
}

// aioSubmit(ctx): io_submit everything queued.
static napi_value aio_submit(napi_env env, napi_callback_info info) {
  size_t argc;
  napi_value argv[1];
  aio_t *a = ctx_args(env, info, argv, 1, true, &argc, NULL);
  if (a == NULL) return NULL;
  if (a->nqueued > 0) submit_queued(a);
  return NULL;
}

// aioStats(ctx, out: Float64Array(6)): queued, in flight, failed waiting, io_submit calls,
// wakeups, EAGAIN refusals. Works on a closed context too (zeros in flight).
static napi_value aio_stats(napi_env env, napi_callback_info info) {
  size_t argc;
  napi_value argv[2];
  const char *usage = "aioStats(ctx, Float64Array(6))";
  aio_t *a = ctx_args(env, info, argv, 2, false, &argc, usage);
  if (a == NULL) return NULL;
  napi_typedarray_type type;
  size_t n = 0;
  void *data = NULL;
  bool is_ta = false;
  if (napi_is_typedarray(env, argv[1], &is_ta) != napi_ok || !is_ta || napi_get_typedarray_info(env, argv[1], &type, &n, &data, NULL, NULL) != napi_ok ||
      type != napi_float64_array || n < 6) {
    napi_throw_type_error(env, "EINVAL", usage);
    return NULL;
  }
  double *out = (double *)data;
  out[0] = a->nqueued;
  out[1] = a->inflight;
  out[2] = a->nfailed;
  out[3] = a->submits;
  out[4] = a->wakeups;
  out[5] = a->eagains;
  return NULL;
}

// aioClose(ctx, done?): stops the poll and destroys the context (io_destroy on the threadpool);
// `done()` is called once both are finished. Refuses (EBUSY) while anything is queued or in
// flight: wait for the completions first. Closing a closed context does nothing.
static napi_value aio_close(napi_env env, napi_callback_info info) {
  size_t argc;
  napi_value argv[2];
  const char *usage = "aioClose(ctx, done?)";
  aio_t *a = ctx_args(env, info, argv, 2, false, &argc, usage);
  if (a == NULL) return NULL;
  napi_valuetype donetype = napi_undefined;
  if (argc > 1 && (napi_typeof(env, argv[1], &donetype) != napi_ok || (donetype != napi_function && donetype != napi_undefined))) {
    napi_throw_type_error(env, "EINVAL", usage);
    return NULL;
  }
  if (a->state != ST_OPEN) return NULL;
  if (a->nqueued + a->inflight + a->nfailed > 0) {
    napi_throw_error(env, "EBUSY", "aioClose: requests are still in flight; close once every completion has arrived");
    return NULL;
  }
  if (donetype == napi_function && napi_create_reference(env, argv[1], 1, &a->done_ref) != napi_ok) {
    napi_throw_error(env, "ENOMEM", "aioClose: could not hold its callback");
    return NULL;
  }
  // The callback is not needed any more: whatever it reaches may be collected from now on.
  if (a->callback_ref != NULL) napi_delete_reference(env, a->callback_ref);
  a->callback_ref = NULL;
  shut(a, false);
  return NULL;
}

// errnoName(errno) -> [code, message], or null where glibc has no name for it. libuv, and so
// Node, names only the errnos it knows (no EDQUOT, EREMOTEIO, ENODATA...), and a block device
// under O_DIRECT returns those.
static napi_value errno_name(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t err = 0;
  if (argc != 1 || napi_get_value_int32(env, argv[0], &err) != napi_ok || err <= 0) {
    napi_throw_type_error(env, "EINVAL", "errnoName(errno > 0)");
    return NULL;
  }
  const char *name = strerrorname_np(err);
  napi_value out, code, message;
  if (name == NULL) {
    napi_get_null(env, &out);
    return out;
  }
  napi_create_array_with_length(env, 2, &out);
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, strerror(err), NAPI_AUTO_LENGTH, &message);
  napi_set_element(env, out, 0, code);
  napi_set_element(env, out, 1, message);
  return out;
}

napi_value aio_register(napi_env env, napi_value exports) {
  static const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"aioOpen", aio_open},   {"aioQueue", aio_queue}, {"aioSubmit", aio_submit},
      {"aioStats", aio_stats}, {"aioClose", aio_close}, {"errnoName", errno_name},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value fn;
    napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &fn);
    napi_set_named_property(env, exports, fns[i].name, fn);
  }
  return exports;
}

{
  "targets": [
    {
      "target_name": "blkfilter_native",
      "sources": ["src/seek.c", "src/nowait.c", "src/aio.c", "src/batch.c", "src/args.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Werror"]
    }
  ]
}

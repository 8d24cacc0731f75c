{
  "targets": [
    {
      "target_name": "blkfilter_native",
      "sources": ["src/seek.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Werror"]
    }
  ]
}

"""Looking inside a v2 teacher-feature store, one module per verb of `distillbev inspect-cache`.

    summarize_cache("runs/cache.zarr")          # summary.py: manifest, progress, sizes on disk
    verify_cache("runs/cache.zarr", workers=2)  # verify.py: every chunk decoded and checked; report.problems
    cache_stats("runs/cache.zarr", subset=20)   # stats.py: per-layer fp32 statistics
    compare_caches("fp16.zarr", "int8.zarr")    # compare.py: per-array cosine / max-abs difference

Every function returns a plain dataclass whose `to_json()` is what `distillbev inspect-cache --json` prints
(`--render` draws a sample: `pipeline/report/cache_render.py`). `arrays.py` walks a store's arrays for them.
"""

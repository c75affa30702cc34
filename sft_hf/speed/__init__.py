"""CPU speed levers, each measured in benchmarks/README.md: per-example attention inside padding-free rows
(varlen_attention.py), fp32 linears on oneDNN (onednn_linear.py), threads (threads.py), tcmalloc (allocator.py)."""

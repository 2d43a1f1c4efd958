"""Side-by-side benchmarks of jaxconv against PyTorch: `python -m bench <name> [options]`.

Each benchmark is a module bench/<name>.py with `main(argv)`; results go to BENCHMARKS.md.
"""

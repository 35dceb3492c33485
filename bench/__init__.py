"""Microbenchmarks of htakl_kernels against its references and peers: `python -m bench --help`."""

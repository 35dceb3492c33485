"""Op glue, one module per op: fake implementations (so torch.compile traces the ops), the
autograd formulas, and the call of an op. Every kernel module registers its ops here when it is
imported (as extension-cpp's kernels register implementations of ops defined in Python), so this
package imports nothing of the package but `_library` and `_validation`."""

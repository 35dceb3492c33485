"""The end-to-end demo: `python -m htakl_kernels.demo --help`.

Distils spiking students (this package's MultiStepLIF) from an ANN teacher with cross-entropy,
standard KL and HTA-KL, and reports accuracy, firing rates, energy and loss time. Modules:
`data` (digits, CIFAR pickles), `models` (small, ResNet-19/20, VGG-16), `energy` (operation
counting), `training` (objectives, training loop, checkpoints), `plotting`, `__main__` (CLI).
"""

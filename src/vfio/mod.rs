//! Kernel VFIO backend (vfio-pci).

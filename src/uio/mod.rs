//! uio_pci_generic backend: /dev/uioN events, masking through sysfs config.

//! Host facts from sysfs: IOMMU groups, drivers, binding, reset methods,
//! IRQ lines.

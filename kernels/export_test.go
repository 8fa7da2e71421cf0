package kernels

// SameModule reports whether two Kernels share one loaded module.
func SameModule(a, b *Kernels) bool { return a.mod != nil && a.mod == b.mod }

package vmm

import (
	"fmt"
	"strconv"
	"strings"
)

// Open returns a device by name: "host" (the host-memory backend with default options),
// "cuda" or "cuda:N" (GPU N through the driver), or "auto" (GPU 0 when it supports VMM, the
// host otherwise). The caller owns the device and closes it.
func Open(name string) (Device, error) {
	switch {
	case name == "host":
		return NewHostDevice(HostOptions{})
	case name == "auto":
		if Supported(0) {
			return NewCUDADevice(0)
		}
		return NewHostDevice(HostOptions{})
	case name == "cuda":
		return NewCUDADevice(0)
	case strings.HasPrefix(name, "cuda:"):
		n, err := strconv.Atoi(strings.TrimPrefix(name, "cuda:"))
		if err != nil {
			return nil, fmt.Errorf("open %q: %w: bad ordinal", name, ErrInvalidArgument)
		}
		return NewCUDADevice(n)
	}
	return nil, fmt.Errorf("open %q: %w: want host, cuda, cuda:N or auto", name, ErrInvalidArgument)
}

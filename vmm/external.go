package vmm

// External is device memory pagedkv does not own: a pointer, a size and a device handed in by
// the runtime (the KV tensors vLLM allocated, say, as NVIDIA Dynamo's ExternalDeviceMemory
// wraps them). Nothing is ever mapped, unmapped or freed through it; the runtime keeps it alive
// for as long as pagedkv uses it.
type External struct {
	Addr   Addr
	Size   uint64
	Device int        // CUDA ordinal (0 for host memory)
	Kind   MemoryKind // where the memory lives
}

// Region is one contiguous range of memory in the form RDMA transfer engines register (NIXL's
// (address, length, device id, memory type) descriptors).
type Region struct {
	Addr     Addr
	Len      uint64
	DeviceID int
	Kind     MemoryKind
}

// NIXL returns the region as NIXL's registration tuple: address, length, device id and the
// memory type name ("VRAM" for device memory, "DRAM" for host memory).
func (r Region) NIXL() (addr, length uint64, devID int, memType string) {
	memType = "VRAM"
	if r.Kind == MemoryHost {
		memType = "DRAM"
	}
	return uint64(r.Addr), r.Len, r.DeviceID, memType
}

// Regions returns the external memory as one region.
func (e External) Regions() []Region {
	return []Region{{Addr: e.Addr, Len: e.Size, DeviceID: e.Device, Kind: e.Kind}}
}

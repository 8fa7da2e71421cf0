package blocktable

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/vmm"
)

// DeviceTables keeps a batch's tables in device memory at fixed addresses: one mapping made at
// creation and kept until Close, so a CUDA graph captured against these addresses stays valid
// while the uploads change the contents. It owns its memory; it borrows the Device.
//
// Uploads are synchronous copies on the device's default stream (vmm.Device.CopyIn): when they
// return, a kernel launched afterwards on any stream that synchronises with the default stream
// sees the new tables. Safe for concurrent use; after Close every call returns ErrClosed.
type DeviceTables struct {
	mu     sync.Mutex
	pool   *vmm.Pool
	dev    vmm.Device
	closed bool

	maxSeqs, maxBlocks, maxTokens, maxNNZ int

	// Device addresses of the arrays; fixed for the life of the DeviceTables.
	BlockTables, SeqLens, SlotMapping vmm.Addr // vLLM: int32 [maxSeqs*maxBlocks], int32 [maxSeqs], int64 [maxTokens]
	Indptr, Indices, LastPageLen      vmm.Addr // FlashInfer: int32 [maxSeqs+1], int32 [maxSeqs*maxBlocks], int32 [maxSeqs]
}

// NewDeviceTables maps device memory for batches of up to maxSeqs sequences of up to maxBlocks
// blocks each, and up to maxTokens new tokens per step. Sizes that are not positive are a
// *CountError (ErrInvalidArgument); tables of more than MaxEntries entries a *SizeError
// (ErrTooLarge); a nil device ErrInvalidArgument.
func NewDeviceTables(dev vmm.Device, maxSeqs, maxBlocks, maxTokens int) (*DeviceTables, error) {
	if dev == nil {
		return nil, fmt.Errorf("blocktable: device tables: %w: nil device", ErrInvalidArgument)
	}
	for _, c := range []struct {
		what string
		n    int
	}{{"sequences", maxSeqs}, {"blocks per sequence", maxBlocks}, {"tokens per step", maxTokens}} {
		if c.n <= 0 || c.n > MaxEntries {
			return nil, fmt.Errorf("blocktable: device tables: %w", &CountError{What: c.what, N: c.n, Max: MaxEntries})
		}
	}
	nnz, err := entries("device tables", maxSeqs, maxBlocks)
	if err != nil {
		return nil, fmt.Errorf("blocktable: device tables: %w", err)
	}
	d := &DeviceTables{dev: dev, maxSeqs: maxSeqs, maxBlocks: maxBlocks, maxTokens: maxTokens, maxNNZ: nnz}
	var off uint64
	next := func(bytes int) uint64 { // 256-byte aligned, as kernels' vector loads like
		o := off
		off += (uint64(bytes) + 255) &^ 255
		return o
	}
	oBT, oSL, oSM := next(4*nnz), next(4*maxSeqs), next(8*maxTokens)
	oIP, oIX, oLP := next(4*(maxSeqs+1)), next(4*nnz), next(4*maxSeqs)
	size, ok := checked.RoundUp(off, dev.Info().Granularity)
	if !ok {
		return nil, fmt.Errorf("blocktable: device tables: %w: granularity %d", ErrInvalidArgument, dev.Info().Granularity)
	}
	pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: size, PageSize: size})
	if err != nil {
		return nil, fmt.Errorf("blocktable: device tables: %w", err)
	}
	base, err := pool.Map(0, size)
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("blocktable: device tables: %w", err)
	}
	d.pool = pool
	d.BlockTables, d.SeqLens, d.SlotMapping = base+vmm.Addr(oBT), base+vmm.Addr(oSL), base+vmm.Addr(oSM)
	d.Indptr, d.Indices, d.LastPageLen = base+vmm.Addr(oIP), base+vmm.Addr(oIX), base+vmm.Addr(oLP)
	return d, nil
}

func bytesOf[T int32 | int64](s []T) []byte {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), len(s)*int(unsafe.Sizeof(s[0])))
}

// lock locks open tables made by NewDeviceTables, or reports why not (then nothing is locked).
func (d *DeviceTables) lock() error {
	if d == nil || d.pool == nil {
		return fmt.Errorf("blocktable: device tables: %w: nil or not made by NewDeviceTables", ErrInvalidArgument)
	}
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return fmt.Errorf("blocktable: device tables: %w", ErrClosed)
	}
	return nil
}

// UploadVLLM copies t's valid rows and slots into the device arrays. t.MaxBlocks must equal the
// maxBlocks the tables were made for (the row stride kernels are told).
func (d *DeviceTables) UploadVLLM(t *VLLM, slots []int64) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := t.check(0); err != nil {
		return fmt.Errorf("blocktable: upload vLLM tables: %w", err)
	}
	if t.MaxBlocks != d.maxBlocks {
		return fmt.Errorf("blocktable: upload vLLM tables: %w", &SizeError{What: "vLLM row stride", Need: t.MaxBlocks, Cap: d.maxBlocks})
	}
	if t.Rows > d.maxSeqs {
		return fmt.Errorf("blocktable: upload vLLM tables: %w", &SizeError{What: "vLLM rows", Need: t.Rows, Cap: d.maxSeqs})
	}
	if len(slots) > d.maxTokens {
		return fmt.Errorf("blocktable: upload vLLM tables: %w", &SizeError{What: "slot_mapping", Need: len(slots), Cap: d.maxTokens})
	}
	for _, c := range []struct {
		dst vmm.Addr
		src []byte
	}{{d.BlockTables, bytesOf(t.Table())}, {d.SeqLens, bytesOf(t.Lens())}, {d.SlotMapping, bytesOf(slots)}} {
		if err := d.dev.CopyIn(c.dst, c.src); err != nil {
			return fmt.Errorf("blocktable: upload vLLM tables: %w", err)
		}
	}
	return nil
}

// UploadFlashInfer copies f's valid entries into the device arrays. A table whose rows a kernel
// would read outside of (kv_indptr not starting at 0 or going back, a kv_last_page_len outside
// [1, BlockTokens], or not 0 for a row of no blocks: a table written by hand) is a *CountError
// (ErrInvalidArgument) naming the entry, and the device arrays keep the last upload.
func (d *DeviceTables) UploadFlashInfer(f *FlashInfer) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := f.check(0); err != nil {
		return fmt.Errorf("blocktable: upload FlashInfer tables: %w", err)
	}
	if f.Rows > d.maxSeqs {
		return fmt.Errorf("blocktable: upload FlashInfer tables: %w", &SizeError{What: "FlashInfer sequences", Need: f.Rows, Cap: d.maxSeqs})
	}
	nnz := f.NNZ()
	if nnz > d.maxNNZ {
		return fmt.Errorf("blocktable: upload FlashInfer tables: %w", &SizeError{What: "FlashInfer kv_indices", Need: nnz, Cap: d.maxNNZ})
	}
	if err := f.checkRows(); err != nil { // the kernels index kv_indices by kv_indptr unchecked
		return fmt.Errorf("blocktable: upload FlashInfer tables: %w", err)
	}
	for _, c := range []struct {
		dst vmm.Addr
		src []byte
	}{{d.Indptr, bytesOf(f.Indptr[:f.Rows+1])}, {d.Indices, bytesOf(f.Indices[:nnz])}, {d.LastPageLen, bytesOf(f.LastPageLen[:f.Rows])}} {
		if err := d.dev.CopyIn(c.dst, c.src); err != nil {
			return fmt.Errorf("blocktable: upload FlashInfer tables: %w", err)
		}
	}
	return nil
}

// Close returns the device memory; a second Close returns ErrClosed.
func (d *DeviceTables) Close() error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	d.closed = true
	return d.pool.Close()
}

package kernels

import (
	"embed"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/pagedkv/pagedkv/internal/cuda"
	"github.com/pagedkv/pagedkv/vmm"
)

//go:embed gen/kernels.ptx gen/kernels.sm_80.cubin gen/kernels.sm_90.cubin gen/MANIFEST
var gen embed.FS

// Stream is a CUstream handle; 0 is the legacy default stream. The Go implementation ignores it.
type Stream uintptr

// Image says which embedded image a CUDA module was loaded from.
type Image string

// The embedded images.
const (
	ImageSM90 Image = "kernels.sm_90.cubin"
	ImageSM80 Image = "kernels.sm_80.cubin"
	ImagePTX  Image = "kernels.ptx"
	ImageGo   Image = "go" // no module: the Go implementation
)

// Kernels launches the operations on one device. Create it with For; Close it when done.
type Kernels struct {
	dev    vmm.Device
	mod    *module // nil: the Go implementation
	closed atomic.Bool
	// life is held for reading by every call from its check to its return (a launch queued),
	// and for writing by Close: Close never unloads the module or frees the scratch under one.
	life sync.RWMutex

	mu      sync.Mutex // guards the pair scratch
	scratch *vmm.Pool
	pairCap int
	// read is recorded after every launch that reads the scratch, on its stream (readOn): a
	// launch on another stream waits for it before overwriting the pairs.
	read   cuda.Event
	readOn Stream
}

// module is a loaded CUDA module, shared by the Kernels of one context. It holds a reference
// of its own to the primary context (ctx), released after the unload, so that the device's
// Close cannot destroy the context under it; key is the device's Context it is found by.
type module struct {
	ctx, key                                   *cuda.Context
	mod                                        cuda.Module
	image                                      Image
	refs                                       int
	copyBlocks, writeKV, writeKVFP8, attention cuda.Function
}

var (
	modMu   sync.Mutex
	modules = map[*cuda.Context]*module{}
)

// For returns the kernels of dev: the CUDA kernels for a *vmm.CUDADevice (loading the module
// into its context on first use), the Go implementation for any other device.
func For(dev vmm.Device) (*Kernels, error) {
	if dev == nil {
		return nil, fmt.Errorf("kernels: %w: nil device", vmm.ErrInvalidArgument)
	}
	k := &Kernels{dev: dev}
	if cd, ok := dev.(*vmm.CUDADevice); ok {
		m, err := acquire(cd.Context())
		if err != nil {
			return nil, err
		}
		k.mod = m
	}
	return k, nil
}

// Image returns the image the kernels run from (ImageGo for the Go implementation).
func (k *Kernels) Image() Image {
	if k == nil || k.mod == nil {
		return ImageGo
	}
	return k.mod.image
}

func acquire(ctx *cuda.Context) (*module, error) {
	modMu.Lock()
	defer modMu.Unlock()
	if m, ok := modules[ctx]; ok {
		m.refs++
		return m, nil
	}
	m, err := load(ctx)
	if err != nil {
		return nil, err
	}
	m.key, m.refs = ctx, 1
	modules[ctx] = m
	return m, nil
}

// imageFor picks the cubin for the device's architecture, PTX otherwise.
func imageFor(ordinal int) Image {
	major, err := cuda.DeviceAttribute(ordinal, cuda.AttrComputeCapabilityMajor)
	if err != nil {
		return ImagePTX
	}
	switch major {
	case 9:
		return ImageSM90
	case 8:
		return ImageSM80
	}
	return ImagePTX
}

// load loads the image for the context's GPU, falling back to PTX when the driver refuses the
// cubin.
func load(dev *cuda.Context) (*module, error) {
	ctx, err := cuda.RetainPrimaryContext(dev.Ordinal())
	if err != nil {
		return nil, fmt.Errorf("kernels: %w", err)
	}
	img := imageFor(ctx.Ordinal())
	m, err := loadImage(ctx, img)
	if err != nil && img != ImagePTX && errors.Is(err, errNoBinary) {
		m, err = loadImage(ctx, ImagePTX)
	}
	if err != nil {
		return nil, errors.Join(err, ctx.Release())
	}
	return m, nil
}

var errNoBinary = errors.New("no binary for this GPU")

func loadImage(ctx *cuda.Context, img Image) (*module, error) {
	data, err := gen.ReadFile("gen/" + string(img))
	if err != nil {
		return nil, fmt.Errorf("kernels: %w: no embedded image %q: %v", vmm.ErrInvalidArgument, img, err)
	}
	if img == ImagePTX {
		data = append(data, 0) // the driver reads PTX as a C string
	}
	mod, err := ctx.ModuleLoadData(data)
	if err != nil {
		var ce *cuda.Error
		if errors.As(err, &ce) && (ce.Code == cuda.ErrorNoBinaryForGPU || ce.Code == cuda.ErrorInvalidImage) {
			err = fmt.Errorf("%w: %w", errNoBinary, err)
		}
		return nil, fmt.Errorf("kernels: load %s: %w", img, err)
	}
	m := &module{ctx: ctx, mod: mod, image: img}
	for _, f := range []struct {
		fn   *cuda.Function
		name string
	}{{&m.copyBlocks, "copy_blocks"}, {&m.writeKV, "write_kv"}, {&m.writeKVFP8, "write_kv_fp8"}, {&m.attention, "paged_attention_decode"}} {
		if *f.fn, err = ctx.ModuleGetFunction(mod, f.name); err != nil {
			ctx.ModuleUnload(mod)
			return nil, fmt.Errorf("kernels: %s: %w", f.name, err)
		}
	}
	return m, nil
}

// LoadTime loads the module for dev's context from the given image into a fresh module and
// unloads it again, for measuring cold load cost (the bench program). It is not needed for use.
func LoadTime(dev *vmm.CUDADevice, img Image) error {
	if dev.Context() == nil {
		return fmt.Errorf("kernels: load time: %w: no CUDA device", vmm.ErrInvalidArgument)
	}
	m, err := loadImage(dev.Context(), img)
	if err != nil {
		return err
	}
	return m.ctx.ModuleUnload(m.mod)
}

// errNotMade is what every call on a nil Kernels, or one not made by For, returns.
var errNotMade = fmt.Errorf("kernels: %w: nil kernels, or not made by For", vmm.ErrInvalidArgument)

// usable returns errNotMade for a nil Kernels or one not made by For, and ErrClosed for a closed
// one: it has given its module up, and must not fall back to the Go implementation.
// enter checks that k is open and keeps it so until exit. Calls made under it use the
// unexported implementations, never an entering method: a read lock taken twice waits for a
// Close that waits for the first.
func (k *Kernels) enter() error {
	if k == nil || k.dev == nil {
		return errNotMade
	}
	k.life.RLock()
	if k.closed.Load() {
		k.life.RUnlock()
		return fmt.Errorf("kernels: %w", vmm.ErrClosed)
	}
	return nil
}

func (k *Kernels) exit() { k.life.RUnlock() }

// Close releases the scratch buffer and the module reference; the last Kernels of a context
// unloads the module. Every other call on a closed Kernels is ErrClosed; closing twice is a
// no-op.
func (k *Kernels) Close() error {
	if k == nil || k.dev == nil {
		return errNotMade
	}
	if k.closed.Swap(true) {
		return nil
	}
	k.life.Lock() // the calls under way end first
	defer k.life.Unlock()
	var errs []error
	k.mu.Lock()
	if k.read != 0 { // the last launch may still read the scratch
		errs = append(errs, k.mod.ctx.EventSynchronize(k.read), k.mod.ctx.EventDestroy(k.read))
		k.read = 0
	}
	if k.scratch != nil {
		errs = append(errs, k.scratch.Close())
		k.scratch = nil
	}
	k.mu.Unlock()
	if k.mod != nil {
		modMu.Lock()
		k.mod.refs--
		if k.mod.refs == 0 {
			delete(modules, k.mod.key)
			errs = append(errs, k.mod.ctx.ModuleUnload(k.mod.mod), k.mod.ctx.Release())
		}
		modMu.Unlock()
		// k.mod stays: a call that passed usable before Close still reads it, and must not
		// take a nil module for the Go implementation.
	}
	return errors.Join(errs...)
}

// ScratchBytes returns the device memory the kernels hold for themselves: the pair staging
// buffer CopyBlocks maps on its first CUDA launch (0 for the Go implementation), freed by Close.
func (k *Kernels) ScratchBytes() uint64 {
	if k == nil {
		return 0
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.scratch == nil {
		return 0
	}
	return k.scratch.Capacity()
}

// Mark is a point in a stream's work: the work queued on the stream before it. The Go
// implementation runs synchronously, so its marks are reached when made. Close a Mark when done;
// it stays usable after its Kernels is closed, as long as the device is open.
type Mark struct {
	ctx *cuda.Context // the event's, which outlives the Kernels and its module
	ev  cuda.Event
}

// Mark records a point in s's work (a CUDA event on s).
func (k *Kernels) Mark(s Stream) (*Mark, error) {
	if err := k.enter(); err != nil {
		return nil, err
	}
	defer k.exit()
	if k.mod == nil {
		return &Mark{}, nil
	}
	ev, err := k.mod.ctx.EventCreate(cuda.EventDisableTiming)
	if err != nil {
		return nil, fmt.Errorf("kernels: mark: %w", err)
	}
	if err := k.mod.ctx.EventRecord(ev, cuda.Stream(s)); err != nil {
		k.mod.ctx.EventDestroy(ev)
		return nil, fmt.Errorf("kernels: mark: %w", err)
	}
	return &Mark{ctx: k.mod.ctx, ev: ev}, nil
}

// Wait blocks until the work before the mark is done.
func (mk *Mark) Wait() error {
	if mk == nil || mk.ev == 0 {
		return nil
	}
	return mk.ctx.EventSynchronize(mk.ev)
}

// Done reports, without blocking, whether the work before the mark is done.
func (mk *Mark) Done() (bool, error) {
	if mk == nil || mk.ev == 0 {
		return true, nil
	}
	return mk.ctx.EventQuery(mk.ev)
}

// Close releases the mark's event; it does not wait for it.
func (mk *Mark) Close() error {
	if mk == nil || mk.ev == 0 {
		return nil
	}
	err := mk.ctx.EventDestroy(mk.ev)
	mk.ev = 0
	return err
}

// Synchronize waits for the work queued on s.
func (k *Kernels) Synchronize(s Stream) error {
	if err := k.enter(); err != nil {
		return err
	}
	defer k.exit()
	if k.mod == nil {
		return nil
	}
	return k.mod.ctx.StreamSynchronize(cuda.Stream(s))
}

func ptr(a vmm.Addr) unsafe.Pointer { p := uint64(a); return unsafe.Pointer(&p) }

func i32(v int) unsafe.Pointer { x := int32(v); return unsafe.Pointer(&x) }

func i64(v int64) unsafe.Pointer { return unsafe.Pointer(&v) }

func f32(v float32) unsafe.Pointer { return unsafe.Pointer(&v) }

// CopyBlocks copies blocks of blockStride bytes within the arena at base: pairs holds
// (src, dst) block ids as vLLM's [N,2] block_mapping, flattened. base is aligned to 16 bytes (an
// arena's is: it is page aligned). Destinations must be distinct and not be sources of other
// pairs. Every id is checked before anything is copied: a negative one, or one whose block would
// lie past the end of the address space, is ErrInvalidArgument. On CUDA it stages the pairs in
// device memory and launches once per up to 128k pairs on s, returning once queued.
func (k *Kernels) CopyBlocks(s Stream, base vmm.Addr, pairs []int64, blockStride uint64) error {
	if err := k.enter(); err != nil {
		return err
	}
	defer k.exit()
	return k.copyBlocks(s, base, pairs, blockStride)
}

// copyBlocks is CopyBlocks under enter.
func (k *Kernels) copyBlocks(s Stream, base vmm.Addr, pairs []int64, blockStride uint64) error {
	if err := checkStride(len(pairs)%2 == 0, blockStride); err != nil {
		return fmt.Errorf("kernels: copy blocks: %d pair values: %w", len(pairs), err)
	}
	if err := checkBase(base); err != nil {
		return fmt.Errorf("kernels: copy blocks: %w", err)
	}
	if err := checkPairs(pairs, 0, base, blockStride); err != nil {
		return fmt.Errorf("kernels: copy blocks: %w", err)
	}
	if k.mod == nil {
		for i := 0; i < len(pairs); i += 2 {
			src := base + vmm.Addr(uint64(pairs[i])*blockStride)
			dst := base + vmm.Addr(uint64(pairs[i+1])*blockStride)
			if err := k.dev.Copy(dst, src, blockStride); err != nil {
				return fmt.Errorf("kernels: copy blocks: pair %d: %w", i/2, err)
			}
		}
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	for len(pairs) > 0 {
		n := min(len(pairs)/2, 1<<17)
		scratch, err := k.pairScratch(n)
		if err != nil {
			return err
		}
		if err := k.scratchFree(s); err != nil {
			return err
		}
		b := unsafe.Slice((*byte)(unsafe.Pointer(&pairs[0])), 16*n)
		if err := k.mod.ctx.MemcpyHtoDAsync(cuda.DevicePtr(scratch), b, cuda.Stream(s)); err != nil {
			return fmt.Errorf("kernels: copy blocks: stage pairs: %w", err)
		}
		if err := k.copyBlocksDevice(s, base, scratch, n, blockStride); err != nil {
			return err
		}
		if err := k.mod.ctx.EventRecord(k.read, cuda.Stream(s)); err != nil {
			return fmt.Errorf("kernels: copy blocks: %w", err)
		}
		k.readOn = s
		pairs = pairs[2*n:]
	}
	return nil
}

// scratchFree makes s wait until the last launch that read the pair scratch (on another
// stream) is done, so that s may overwrite it. The caller holds k.mu.
func (k *Kernels) scratchFree(s Stream) error {
	if k.read == 0 {
		ev, err := k.mod.ctx.EventCreate(cuda.EventDisableTiming)
		if err != nil {
			return fmt.Errorf("kernels: copy blocks: %w", err)
		}
		k.read, k.readOn = ev, s
		return nil
	}
	if s == k.readOn {
		return nil // stream order already
	}
	if err := k.mod.ctx.StreamWaitEvent(cuda.Stream(s), k.read); err != nil {
		return fmt.Errorf("kernels: copy blocks: %w", err)
	}
	return nil
}

// pairScratch returns device memory for n pairs, mapping it on first use.
func (k *Kernels) pairScratch(n int) (vmm.Addr, error) {
	if k.scratch == nil {
		g := k.dev.Info().Granularity
		size := (uint64(16<<17) + g - 1) / g * g
		pool, err := vmm.NewPool(k.dev, vmm.PoolConfig{Capacity: size, PageSize: size})
		if err != nil {
			return 0, fmt.Errorf("kernels: pair scratch: %w", err)
		}
		if _, err := pool.Map(0, size); err != nil {
			pool.Close()
			return 0, fmt.Errorf("kernels: pair scratch: %w", err)
		}
		k.scratch = pool
	}
	return k.scratch.Base(), nil
}

// CopyBlocksDevice is CopyBlocks with the n pairs already in device memory at pairs (int64
// [n,2], aligned to 8 bytes): nothing is staged, so it can be captured in a CUDA graph. The Go
// implementation reads the pairs through the device, a chunk at a time, and checks their ids as
// CopyBlocks does before it copies any; the CUDA kernel reads them only when it runs and does not
// check them. n may be at most MaxGridX.
func (k *Kernels) CopyBlocksDevice(s Stream, base, pairs vmm.Addr, n int, blockStride uint64) error {
	if err := k.enter(); err != nil {
		return err
	}
	defer k.exit()
	return k.copyBlocksDevice(s, base, pairs, n, blockStride)
}

// copyBlocksDevice is CopyBlocksDevice under enter.
func (k *Kernels) copyBlocksDevice(s Stream, base, pairs vmm.Addr, n int, blockStride uint64) error {
	if n < 0 || n > MaxGridX {
		return fmt.Errorf("kernels: copy blocks: %w", &vmm.RangeError{Offset: 0, Size: uint64(n), Limit: MaxGridX + 1})
	}
	if err := checkStride(true, blockStride); err != nil {
		return fmt.Errorf("kernels: copy blocks: %w", err)
	}
	if err := checkBase(base); err != nil {
		return fmt.Errorf("kernels: copy blocks: %w", err)
	}
	if n > 0 && (pairs == 0 || pairs%8 != 0) { // the kernel reads them as int64
		return fmt.Errorf("kernels: copy blocks: %w", invalid("pairs %#x: 0 or not aligned to 8", uint64(pairs)))
	}
	if n == 0 {
		return nil
	}
	if k.mod == nil {
		return k.copyPairsGo(s, base, pairs, n, blockStride)
	}
	const threads = 256
	vecs := blockStride / 16
	chunks := (vecs + threads*8 - 1) / (threads * 8) // about 32 KiB per CTA
	err := k.mod.ctx.LaunchKernel(k.mod.copyBlocks, [3]uint32{uint32(n), uint32(chunks), 1}, [3]uint32{threads, 1, 1}, 0, cuda.Stream(s),
		[]unsafe.Pointer{ptr(base), ptr(pairs), i64(int64(blockStride))})
	if err != nil {
		return fmt.Errorf("kernels: copy blocks: %w", err)
	}
	return nil
}

// copyPairsGo is the Go implementation of CopyBlocksDevice. It reads the pairs a chunk at a time
// twice: it checks them all before it copies any.
func (k *Kernels) copyPairsGo(s Stream, base, pairs vmm.Addr, n int, blockStride uint64) error {
	const chunk = 4096
	host := make([]byte, 16*min(n, chunk))
	p := make([]int64, 2*min(n, chunk))
	for _, check := range []bool{true, false} {
		for done := 0; done < n; done += chunk {
			c := min(n-done, chunk)
			if err := k.dev.CopyOut(host[:16*c], pairs+vmm.Addr(16*done)); err != nil {
				return fmt.Errorf("kernels: copy blocks: read pairs: %w", err)
			}
			for i := range 2 * c {
				p[i] = int64(binary.LittleEndian.Uint64(host[8*i:]))
			}
			if check {
				if err := checkPairs(p[:2*c], done, base, blockStride); err != nil {
					return fmt.Errorf("kernels: copy blocks: %w", err)
				}
			} else if err := k.copyBlocks(s, base, p[:2*c], blockStride); err != nil {
				return err
			}
		}
	}
	return nil
}

// WriteKV stores numTokens tokens' fp16 K and V of one layer: it is Write of the KVWrite with
// these fields (Format FP16). key and value hold numTokens rows of tokenBytes, slotMapping
// numTokens int64 slots (negative: skip); kBase and vBase are the layer's K and V bases
// (kvcache.Manager.LayerBase). value and vBase both 0 write K only. It sets no KVWrite.Blocks:
// Write with Blocks keeps a bad slot inside the arena.
func (k *Kernels) WriteKV(s Stream, kBase, vBase, key, value, slotMapping vmm.Addr, numTokens int, tokenBytes uint64, blockTokens int, blockStride uint64) error {
	return k.Write(s, KVWrite{KBase: kBase, VBase: vBase, Key: key, Value: value, SlotMapping: slotMapping,
		NumTokens: numTokens, RowBytes: tokenBytes, BlockTokens: blockTokens, BlockStride: blockStride})
}

// KVWrite describes one layer's write of new tokens' rows into the cache, what vLLM's
// reshape_and_cache_flash does: token i's rows go to slot SlotMapping[i], that is to row
// slot%BlockTokens of block slot/BlockTokens, at KBase (VBase) + block*BlockStride. The caller
// owns every address; the write reads Key, Value and SlotMapping and writes only those rows.
// The zero value of Format, KScale and VScale is an fp16 write. The kernels store 16 bytes at a
// time (8 in fp8): KBase, VBase and BlockStride are aligned to that, Key and Value to 16 bytes,
// SlotMapping to 8.
type KVWrite struct {
	// KBase and VBase are the layer's K and V bases (kvcache.Manager.LayerBase). VBase and Value
	// both 0 write K only: MLA's latent rows, one per token and layer.
	KBase, VBase vmm.Addr
	// Key and Value hold NumTokens fp16 input rows of RowBytes each, one after another.
	Key, Value vmm.Addr
	// SlotMapping holds NumTokens int64 slots. A negative slot (padding) is skipped.
	SlotMapping vmm.Addr
	// NumTokens is at most MaxGridX.
	NumTokens int
	// RowBytes is one token's input row: a multiple of 16, at most MaxRowBytes. In the cache
	// the row takes RowBytes in fp16 and RowBytes/2 in fp8.
	RowBytes uint64
	// BlockTokens is the tokens of a block. BlockStride is the distance between blocks and holds
	// BlockTokens cache rows.
	BlockTokens int
	BlockStride uint64
	// Format is the cache's element format. The fp8 formats store each element x of K as
	// fp8(x/KScale) and of V as fp8(x/VScale), rounded to nearest even and saturated: the scales
	// are then finite and positive. A scale that is not used (fp16, or V in a K-only write) is 0.
	Format         Format
	KScale, VScale float32
	// KScaleAt and VScaleAt, when not 0, are the device addresses (4-byte aligned) of the fp32 K
	// and V scales, which the write reads when it runs instead of KScale and VScale (then 0):
	// vLLM's kernels take k_scale and v_scale as device tensors, and kvcache.Hybrid.Scales keeps
	// an fp8 group's per-layer scales at such addresses.
	KScaleAt, VScaleAt vmm.Addr
	// Blocks, when not 0, is the arena's size in blocks (kvcache.Layout.Blocks): a slot in block
	// Blocks or later is bad. The kernel skips it, as a negative slot (a kernel has no error to
	// return); the Go implementation refuses the write before writing any row. 0 bounds the
	// blocks by the address space alone.
	Blocks int
}

// blockLimit returns the blocks the write may reach: Blocks, or those below the end of the
// address space from the higher base.
func (w KVWrite) blockLimit() int64 {
	return limitBlocks(w.Blocks, max(w.KBase, w.VBase), w.BlockStride)
}

// limitBlocks returns blocks, when not 0, or else how many blocks of stride bytes fit between
// top and the end of the address space (at most MaxInt64).
func limitBlocks(blocks int, top vmm.Addr, stride uint64) int64 {
	if blocks > 0 {
		return int64(blocks)
	}
	return int64(min(math.MaxInt64, math.MaxUint64-uint64(top)) / stride)
}

// kOnly reports a write of K alone.
func (w KVWrite) kOnly() bool { return w.Value == 0 && w.VBase == 0 }

// cacheRow returns the bytes a token's row takes in the cache.
func (w KVWrite) cacheRow() uint64 { return w.RowBytes / 2 * uint64(w.Format.Bytes()) }

// align returns the alignment of the cache rows' stores: 16 bytes in fp16, 8 in fp8.
func (w KVWrite) align() uint64 { return 8 * uint64(w.Format.Bytes()) }

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{vmm.ErrInvalidArgument}, args...)...)
}

func (w KVWrite) validate() error {
	if w.Blocks < 0 || w.Blocks > math.MaxInt32 {
		return invalid("%d blocks: 0 (unbounded) to %d", w.Blocks, math.MaxInt32)
	}
	if w.NumTokens < 0 || w.NumTokens > MaxGridX || w.RowBytes == 0 || w.RowBytes%16 != 0 || w.RowBytes > MaxRowBytes ||
		w.BlockTokens <= 0 || w.BlockTokens > math.MaxInt32 {
		return invalid("%d tokens (at most %d) of %d bytes (a multiple of 16, at most %d), %d tokens per block",
			w.NumTokens, MaxGridX, w.RowBytes, MaxRowBytes, w.BlockTokens)
	}
	if w.Format.Bytes() == 0 {
		return invalid("format %d is none of fp16, fp8_e4m3, fp8_e5m2", uint8(w.Format))
	}
	row, align := w.cacheRow(), w.align()
	if w.BlockStride == 0 || w.BlockStride%align != 0 || w.BlockStride > math.MaxInt64 || uint64(w.BlockTokens)*row > w.BlockStride {
		return invalid("block stride %d: a multiple of %d that holds %d %s rows of %d bytes", w.BlockStride, align, w.BlockTokens, w.Format, row)
	}
	if (w.Value == 0) != (w.VBase == 0) {
		return invalid("value %#x and V base %#x: both 0 (K only) or neither", uint64(w.Value), uint64(w.VBase))
	}
	if w.KBase == 0 || w.Key == 0 || w.SlotMapping == 0 {
		return invalid("K base %#x, key %#x, slot mapping %#x: none may be 0", uint64(w.KBase), uint64(w.Key), uint64(w.SlotMapping))
	}
	if uint64(w.KBase|w.VBase)%align != 0 || uint64(w.Key|w.Value)%16 != 0 || w.SlotMapping%8 != 0 {
		return invalid("K base %#x and V base %#x (aligned to %d), key %#x and value %#x (to 16), slot mapping %#x (to 8): misaligned",
			uint64(w.KBase), uint64(w.VBase), align, uint64(w.Key), uint64(w.Value), uint64(w.SlotMapping))
	}
	return checkScales(w.Format, w.KScale, w.VScale, w.KScaleAt, w.VScaleAt, !w.kOnly())
}

// checkScales reports fp8 scales that are not finite and positive, a scale in use given both
// by value and by address or by neither, a misaligned address, and scales given where none is
// used: every scale in fp16, the V scale when no V is read or written.
func checkScales(f Format, kScale, vScale float32, kAt, vAt vmm.Addr, vUsed bool) error {
	good := func(x float32, at vmm.Addr, used bool) bool {
		switch {
		case !f.fp8() || !used:
			return x == 0 && at == 0
		case at != 0:
			return x == 0 && at%4 == 0
		}
		return x > 0 && x <= math.MaxFloat32
	}
	if !good(kScale, kAt, true) || !good(vScale, vAt, vUsed) {
		return invalid("%s with K scale %g and V scale %g (in device memory at %#x and %#x): an fp8 scale in use is finite and "+
			"positive, or 0 with a 4-byte aligned address to read it from; a scale not in use is 0 at 0", f, kScale, vScale, uint64(kAt), uint64(vAt))
	}
	return nil
}

// scaleAt reads the fp32 at device address at, or returns x when at is 0: what the kernels do
// with a scale given by address.
func (k *Kernels) scaleAt(x float32, at vmm.Addr) (float32, error) {
	if at == 0 {
		return x, nil
	}
	var b [4]byte
	if err := k.dev.CopyOut(b[:], at); err != nil {
		return 0, fmt.Errorf("read scale at %#x: %w", uint64(at), err)
	}
	return math.Float32frombits(binary.LittleEndian.Uint32(b[:])), nil
}

// Write stores the rows w describes on s. On CUDA it is one launch of write_kv (fp16) or
// write_kv_fp8, returning once queued; the kernel reads the slots only when it runs and skips a
// bad one (in block Blocks or later, or past the end of the address space). The Go
// implementation checks every slot before it writes a row: a bad one is ErrInvalidArgument.
func (k *Kernels) Write(s Stream, w KVWrite) error {
	if err := k.enter(); err != nil {
		return err
	}
	defer k.exit()
	if err := w.validate(); err != nil {
		return fmt.Errorf("kernels: write kv: %w", err)
	}
	if w.NumTokens == 0 {
		return nil
	}
	if k.mod == nil {
		return k.writeGo(w)
	}
	threads := uint32(min(256, (w.RowBytes/16+31)/32*32))
	args := []unsafe.Pointer{ptr(w.KBase), ptr(w.VBase), ptr(w.Key), ptr(w.Value), ptr(w.SlotMapping),
		i64(int64(w.RowBytes)), i32(w.BlockTokens), i64(int64(w.BlockStride))}
	fn := k.mod.writeKV
	if w.Format.fp8() {
		fn = k.mod.writeKVFP8
		args = append(args, i32(int(w.Format)), f32(w.KScale), f32(w.VScale), ptr(w.KScaleAt), ptr(w.VScaleAt))
	}
	maxSlot := int64(math.MaxInt64) // the first slot the kernel skips
	if b := w.blockLimit(); b <= math.MaxInt64/int64(w.BlockTokens) {
		maxSlot = b * int64(w.BlockTokens)
	}
	args = append(args, i64(maxSlot))
	err := k.mod.ctx.LaunchKernel(fn, [3]uint32{uint32(w.NumTokens), 1, 1}, [3]uint32{threads, 1, 1}, 0, cuda.Stream(s), args)
	if err != nil {
		return fmt.Errorf("kernels: write kv: %w", err)
	}
	return nil
}

// writeGo is the Go implementation of Write: a device copy per row in fp16, a read, a
// conversion and a write per row in fp8.
func (k *Kernels) writeGo(w KVWrite) error {
	row := w.cacheRow()
	var in, out []byte
	if w.Format.fp8() {
		in, out = make([]byte, w.RowBytes), make([]byte, row)
		var err error
		if w.KScale, err = k.scaleAt(w.KScale, w.KScaleAt); err != nil {
			return fmt.Errorf("kernels: write kv: %w", err)
		}
		if w.VScale, err = k.scaleAt(w.VScale, w.VScaleAt); err != nil {
			return fmt.Errorf("kernels: write kv: %w", err)
		}
	}
	// Every slot is checked before a row is written: the slots are read twice.
	blocks := w.blockLimit()
	bt := int64(w.BlockTokens)
	err := k.eachSlot(w, func(t int, slot int64) error {
		if slot >= 0 && slot/bt >= blocks {
			return invalid("token %d: slot %d in block %d: blocks are 0 to %d", t, slot, slot/bt, blocks-1)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("kernels: write kv: %w", err)
	}
	err = k.eachSlot(w, func(t int, slot int64) error {
		if slot < 0 {
			return nil
		}
		off := vmm.Addr(uint64(slot/bt)*w.BlockStride + uint64(slot%bt)*row)
		for _, kv := range [2]struct {
			dst, src vmm.Addr
			scale    float32
		}{{w.KBase, w.Key, w.KScale}, {w.VBase, w.Value, w.VScale}} {
			if kv.dst == 0 {
				continue // K only
			}
			src := kv.src + vmm.Addr(uint64(t)*w.RowBytes)
			var err error
			if w.Format == FP16 {
				err = k.dev.Copy(kv.dst+off, src, row)
			} else if err = k.dev.CopyOut(in, src); err == nil {
				quantize(out, in, w.Format, kv.scale)
				err = k.dev.CopyIn(kv.dst+off, out)
			}
			if err != nil {
				return fmt.Errorf("token %d: %w", t, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("kernels: write kv: %w", err)
	}
	return nil
}

// eachSlot calls fn with each token and its slot, reading the slot mapping a chunk at a time.
func (k *Kernels) eachSlot(w KVWrite, fn func(t int, slot int64) error) error {
	const chunk = 512
	buf := make([]byte, 8*min(w.NumTokens, chunk))
	for done := 0; done < w.NumTokens; done += chunk {
		c := min(w.NumTokens-done, chunk)
		if err := k.dev.CopyOut(buf[:8*c], w.SlotMapping+vmm.Addr(8*done)); err != nil {
			return fmt.Errorf("read slots %d to %d: %w", done, done+c-1, err)
		}
		for i := range c {
			if err := fn(done+i, int64(binary.LittleEndian.Uint64(buf[8*i:]))); err != nil {
				return err
			}
		}
	}
	return nil
}

// quantize stores the fp16 elements of in as fp8 of x/scale in out, the float32 division and
// conversion that write_kv_fp8 does (and vLLM's scaled_convert).
func quantize(out, in []byte, f Format, scale float32) {
	for i := range out {
		out[i] = f.encode(HalfToFloat32(binary.LittleEndian.Uint16(in[2*i:])) / scale)
	}
}

// Attention describes one paged decode attention: for each sequence s and query head h,
// Out[s,h,:] = softmax(Scale * Q[s,h,:] . K^T) V over the attended tokens of the sequence's
// SeqLens[s], read through BlockTables (vLLM: int32 [NumSeqs, MaxBlocks]). Q is fp16 [NumSeqs,
// NumHeads, HeadDim] and Out fp32 [NumSeqs, NumHeads, HeadDim] ([NumSeqs, NumHeads, LatentDim]
// with MLA). K and V are in the arena layout of one layer (KBase, VBase, BlockStride,
// BlockTokens): a token's row of KV head g starts (token*KVHeads + g)*HeadDim elements into its
// block, and BlockStride holds the rows of BlockTokens tokens. All addresses are device addresses the caller owns, aligned to their elements (K and V
// bases and BlockStride to the Format's element, BlockTables and SeqLens to 4 bytes).
//
// The fields after Scale select masks, fp8 and MLA; their zero value is full attention over fp16
// K and V. Every field is validated: a combination that means nothing is ErrInvalidArgument.
type Attention struct {
	Out, Q, KBase, VBase, BlockTables, SeqLens vmm.Addr
	NumSeqs, MaxBlocks                         int
	NumHeads, KVHeads, HeadDim, BlockTokens    int
	BlockStride                                uint64
	Scale                                      float32

	// Window > 0 is a sliding window: the query at position L-1 attends positions >= L-Window.
	// Sinks > 0 keeps positions < Sinks attended as well (StreamingLLM's sink tokens; gpt-oss's
	// sinks are learned per-head logits, which this does not model); it needs a Window.
	Window, Sinks int
	// Chunk > 0 is chunked attention (Llama 4): the query attends the positions of its own chunk,
	// >= floor((L-1)/Chunk)*Chunk. Window and Chunk are not both set.
	Chunk int
	// Format is the format of K's and V's elements. An fp8 element v means v*KScale in K and
	// v*VScale in V: the scales are then finite and positive. With FP16 both are 0.
	Format         Format
	KScale, VScale float32
	// KScaleAt and VScaleAt, when not 0, are the device addresses (4-byte aligned) of the fp32
	// scales, read when the attention runs instead of KScale and VScale (then 0), as in KVWrite.
	KScaleAt, VScaleAt vmm.Addr
	// LatentDim > 0 selects MLA's absorbed form (DeepSeek): each token has one row of HeadDim
	// elements at KBase, the latent (LatentDim elements) then its rope part, shared by all heads:
	// KVHeads is 1 and VBase and VScale are 0. Q per head has HeadDim elements, already absorbed
	// through W_UK; the score is Scale * q . row, and Out per head is the softmax-weighted sum of
	// the rows' first LatentDim elements, to which the caller applies W_UV. In fp8, KScale
	// dequantises the whole row.
	LatentDim int
	// Blocks, when not 0, is the arena's size in blocks (kvcache.Layout.Blocks): an attended
	// table entry of Blocks or more is bad. 0 bounds the blocks by the address space alone.
	Blocks int
}

// blockLimit returns the blocks the attention may read: Blocks, or those below the end of the
// address space from the higher base (see KVWrite.blockLimit).
func (a Attention) blockLimit() int64 {
	return limitBlocks(a.Blocks, max(a.KBase, a.VBase), a.BlockStride)
}

func (a Attention) validate() error {
	if a.NumSeqs < 0 || a.NumSeqs > MaxGridX || a.MaxBlocks <= 0 || a.MaxBlocks > math.MaxInt32 ||
		a.NumHeads <= 0 || a.NumHeads > MaxGridY || a.KVHeads <= 0 || a.NumHeads%a.KVHeads != 0 ||
		a.HeadDim <= 0 || a.HeadDim > 1024 || a.BlockTokens <= 0 || a.BlockTokens > math.MaxInt32 ||
		a.BlockStride == 0 || a.BlockStride > math.MaxInt64 {
		return invalid("%d sequences (at most %d) of %d table blocks, %d heads (at most %d) over %d KV heads, head dim %d (at most 1024), %d tokens per block, block stride %d",
			a.NumSeqs, MaxGridX, a.MaxBlocks, a.NumHeads, MaxGridY, a.KVHeads, a.HeadDim, a.BlockTokens, a.BlockStride)
	}
	if a.Blocks < 0 || a.Blocks > math.MaxInt32 {
		return invalid("%d blocks: 0 (unbounded) to %d", a.Blocks, math.MaxInt32)
	}
	if a.Window < 0 || a.Sinks < 0 || a.Chunk < 0 || max(a.Window, a.Sinks, a.Chunk) > math.MaxInt32 {
		return invalid("window %d, sinks %d, chunk %d: each 0 to %d", a.Window, a.Sinks, a.Chunk, math.MaxInt32)
	}
	if a.Window > 0 && a.Chunk > 0 {
		return invalid("window %d and chunk %d: at most one of them", a.Window, a.Chunk)
	}
	if a.Sinks > 0 && a.Window == 0 {
		return invalid("%d sinks without a window: sinks keep tokens a window drops", a.Sinks)
	}
	esize := a.Format.Bytes()
	if esize == 0 {
		return invalid("format %d is none of fp16, fp8_e4m3, fp8_e5m2", uint8(a.Format))
	}
	mla := a.LatentDim != 0
	if mla && (a.LatentDim < 0 || a.LatentDim > a.HeadDim || a.KVHeads != 1 || a.VBase != 0) {
		return invalid("MLA latent dim %d in rows of %d with %d KV heads and V base %#x: the latent is 1 to the row, with 1 KV head and no V base",
			a.LatentDim, a.HeadDim, a.KVHeads, uint64(a.VBase))
	}
	if err := checkScales(a.Format, a.KScale, a.VScale, a.KScaleAt, a.VScaleAt, !mla); err != nil {
		return err
	}
	if a.Out == 0 || a.Q == 0 || a.KBase == 0 || (a.VBase == 0) != mla || a.BlockTables == 0 || a.SeqLens == 0 {
		return invalid("out %#x, Q %#x, K base %#x, V base %#x, block tables %#x, seq lens %#x: 0 where an address is needed",
			uint64(a.Out), uint64(a.Q), uint64(a.KBase), uint64(a.VBase), uint64(a.BlockTables), uint64(a.SeqLens))
	}
	if uint64(a.BlockTokens)*uint64(a.KVHeads*a.HeadDim*esize) > a.BlockStride { // at most 2^31 * 2^16 * 2^11
		return invalid("block stride %d: it holds %d tokens of %d %s rows of %d elements", a.BlockStride, a.BlockTokens, a.KVHeads, a.Format, a.HeadDim)
	}
	e := vmm.Addr(esize)
	if a.Out%4 != 0 || a.Q%2 != 0 || a.KBase%e != 0 || a.VBase%e != 0 || a.BlockStride%uint64(e) != 0 || (a.BlockTables|a.SeqLens)%4 != 0 {
		return invalid("out %#x, block tables %#x, seq lens %#x (aligned to 4), Q %#x (to 2), K base %#x, V base %#x, block stride %d (to %d): misaligned",
			uint64(a.Out), uint64(a.BlockTables), uint64(a.SeqLens), uint64(a.Q), uint64(a.KBase), uint64(a.VBase), a.BlockStride, esize)
	}
	return nil
}

// attnArgs are the values the kernel and the Go implementation compute with.
type attnArgs struct {
	vBase         vmm.Addr // V rows: KBase in MLA
	vDim          int      // elements of V (and Out) per head: LatentDim in MLA
	scale, vScale float32  // Scale with fp8's KScale folded in; VScale, KScale in MLA, 1 in fp16
	kAt, vAt      vmm.Addr // scales the kernel reads: kAt's multiplies scale, vAt's replaces vScale
}

func (a Attention) args() attnArgs {
	r := attnArgs{vBase: a.VBase, vDim: a.HeadDim, scale: a.Scale, vScale: 1}
	if a.LatentDim > 0 {
		r.vBase, r.vDim = a.KBase, a.LatentDim
	}
	if a.Format.fp8() {
		kScale := a.KScale
		if a.KScaleAt != 0 {
			kScale, r.kAt = 1, a.KScaleAt
		}
		r.scale, r.vScale, r.vAt = a.Scale*kScale, a.VScale, a.VScaleAt
		if a.LatentDim > 0 {
			r.vScale, r.vAt = a.KScale, a.KScaleAt
		}
	}
	return r
}

// span returns the attended positions of a sequence of n tokens: the ns sinks [0, ns) and the
// tail [lo, n). Attended index j is position j below ns and lo+j-ns from there on.
func (a Attention) span(n int64) (ns, lo int64) {
	if a.Window > 0 && n > int64(a.Window) {
		lo = n - int64(a.Window)
	}
	if a.Chunk > 0 && n > 0 {
		lo = (n - 1) / int64(a.Chunk) * int64(a.Chunk)
	}
	return min(int64(a.Sinks), lo), lo
}

// PagedAttention runs the reference decode attention on s. NumSeqs may be at most MaxGridX and
// NumHeads at most MaxGridY. A sequence's table is bad when its length is past MaxBlocks*
// BlockTokens, or when an attended block id is negative, Blocks or more, or past the end of the
// address space. The CUDA kernel reads the lengths and tables only when it runs, and gives a
// sequence with a bad table NaN outputs, reading nothing through it. The Go implementation
// checks every table before it writes any output: a length past the row is ErrOutOfRange, a bad
// block id ErrInvalidArgument.
func (k *Kernels) PagedAttention(s Stream, a Attention) error {
	if err := k.enter(); err != nil {
		return err
	}
	defer k.exit()
	if err := a.validate(); err != nil {
		return fmt.Errorf("kernels: attention: %w", err)
	}
	if a.NumSeqs == 0 {
		return nil
	}
	if k.mod == nil {
		return k.attentionGo(a)
	}
	threads := uint32(max(128, (a.HeadDim+31)/32*32))
	for threads&(threads-1) != 0 { // the tree reductions want a power of two
		threads++
	}
	shmem := uint32(4 * (a.HeadDim + 2*int(threads)))
	r := a.args()
	err := k.mod.ctx.LaunchKernel(k.mod.attention, [3]uint32{uint32(a.NumSeqs), uint32(a.NumHeads), 1}, [3]uint32{threads, 1, 1}, shmem, cuda.Stream(s),
		[]unsafe.Pointer{ptr(a.Out), ptr(a.Q), ptr(a.KBase), ptr(r.vBase), ptr(a.BlockTables), ptr(a.SeqLens),
			i32(a.MaxBlocks), i32(a.NumHeads), i32(a.KVHeads), i32(a.HeadDim), i32(a.BlockTokens),
			i64(int64(a.BlockStride)), f32(r.scale), i32(r.vDim), i32(a.Window), i32(a.Sinks), i32(a.Chunk),
			i32(int(a.Format)), f32(r.vScale), ptr(r.kAt), ptr(r.vAt),
			i64(a.blockLimit())})
	if err != nil {
		return fmt.Errorf("kernels: attention: %w", err)
	}
	return nil
}

// attentionGo is the Go implementation: the same math in float32 with the same online softmax,
// reading through the device one row at a time, so that its memory does not depend on the
// sizes it is given.
func (k *Kernels) attentionGo(a Attention) error {
	var err error
	if a.KScale, err = k.scaleAt(a.KScale, a.KScaleAt); err != nil {
		return fmt.Errorf("kernels: attention: %w", err)
	}
	if a.VScale, err = k.scaleAt(a.VScale, a.VScaleAt); err != nil {
		return fmt.Errorf("kernels: attention: %w", err)
	}
	a.KScaleAt, a.VScaleAt = 0, 0
	r := a.args()
	esize := a.Format.Bytes()
	q, krow, vrow := make([]byte, 2*a.HeadDim), make([]byte, esize*a.HeadDim), make([]byte, esize*a.HeadDim)
	out := make([]byte, 4*r.vDim)
	acc := make([]float32, r.vDim)
	var word [4]byte
	read32 := func(addr vmm.Addr) (int32, error) {
		err := k.dev.CopyOut(word[:], addr)
		return int32(binary.LittleEndian.Uint32(word[:])), err
	}
	elem := func(b []byte, i int) float32 {
		if a.Format == FP16 {
			return HalfToFloat32(binary.LittleEndian.Uint16(b[2*i:]))
		}
		return a.Format.decode(b[i])
	}
	if err := a.checkTables(read32); err != nil {
		return fmt.Errorf("kernels: attention: %w", err)
	}
	group := a.NumHeads / a.KVHeads
	rowBytes := int64(esize * a.HeadDim)
	bt := int64(a.BlockTokens)
	for s := range a.NumSeqs {
		n32, err := read32(a.SeqLens + vmm.Addr(4*s))
		if err != nil {
			return fmt.Errorf("kernels: attention: %w", err)
		}
		n := int64(max(n32, 0))
		ns, lo := a.span(n)
		count := ns + n - lo
		rowOf := a.BlockTables + vmm.Addr(4*int64(s)*int64(a.MaxBlocks))
		for h := range a.NumHeads {
			kvh := int64(h / group)
			if err := k.dev.CopyOut(q, a.Q+vmm.Addr(int64(s*a.NumHeads+h)*int64(2*a.HeadDim))); err != nil {
				return fmt.Errorf("kernels: attention: %w", err)
			}
			clear(acc)
			m, sum := float32(math.Inf(-1)), float32(0)
			var blk int32
			bi := int64(-1)
			for j := range count {
				t := j
				if j >= ns {
					t = lo + j - ns
				}
				if t/bt != bi {
					bi = t / bt
					if blk, err = read32(rowOf + vmm.Addr(4*bi)); err != nil {
						return fmt.Errorf("kernels: attention: %w", err)
					}
				}
				off := vmm.Addr(uint64(blk)*a.BlockStride + uint64((t%bt*int64(a.KVHeads)+kvh)*rowBytes))
				if err := k.dev.CopyOut(krow, a.KBase+off); err != nil {
					return fmt.Errorf("kernels: attention: %w", err)
				}
				dot := float32(0)
				for d := range a.HeadDim {
					dot += HalfToFloat32(binary.LittleEndian.Uint16(q[2*d:])) * elem(krow, d)
				}
				score := dot * r.scale
				if score > m { // rescale what was accumulated under the old maximum
					c := float32(math.Exp(float64(m - score)))
					for d := range acc {
						acc[d] *= c
					}
					sum *= c
					m = score
				}
				p := float32(0) // a score of -Inf weighs nothing, also while the maximum is -Inf
				if !math.IsInf(float64(score), -1) {
					p = float32(math.Exp(float64(score - m)))
				}
				sum += p
				if err := k.dev.CopyOut(vrow, r.vBase+off); err != nil {
					return fmt.Errorf("kernels: attention: %w", err)
				}
				for d := range r.vDim {
					acc[d] += p * elem(vrow, d)
				}
			}
			for d := range r.vDim {
				v := float32(0)
				if count > 0 {
					v = acc[d] / sum * r.vScale
				}
				binary.LittleEndian.PutUint32(out[4*d:], math.Float32bits(v))
			}
			if err := k.dev.CopyIn(a.Out+vmm.Addr(int64(s*a.NumHeads+h)*int64(4*r.vDim)), out); err != nil {
				return fmt.Errorf("kernels: attention: %w", err)
			}
		}
	}
	return nil
}

// checkTables reads every sequence's length and the table entries of the blocks it attends,
// before the Go implementation writes any output. It reports a length past the sequence's table
// row, and an entry that is negative or whose block would lie past the end of the address space.
func (a Attention) checkTables(read32 func(vmm.Addr) (int32, error)) error {
	blocks := a.blockLimit()
	bt := int64(a.BlockTokens)
	maxLen := int64(a.MaxBlocks) * bt
	for s := range a.NumSeqs {
		n32, err := read32(a.SeqLens + vmm.Addr(4*s))
		if err != nil {
			return err
		}
		n := int64(max(n32, 0))
		if n > maxLen {
			return fmt.Errorf("sequence %d: %w", s, &vmm.RangeError{Size: uint64(n), Limit: uint64(maxLen) + 1})
		}
		ns, lo := a.span(n)
		row := a.BlockTables + vmm.Addr(4*int64(s)*int64(a.MaxBlocks))
		for _, span := range [2][2]int64{{0, ns}, {lo, n}} { // the sinks, then the tail
			for b := span[0] / bt; b*bt < span[1]; b++ {
				id, err := read32(row + vmm.Addr(4*b))
				if err != nil {
					return err
				}
				if id < 0 || int64(id) >= blocks {
					return invalid("sequence %d: table block %d is %d: blocks are 0 to %d", s, b, id, blocks-1)
				}
			}
		}
	}
	return nil
}

// Launch limits: a grid's x dimension holds at most 2^31-1 blocks and its y dimension 65535;
// MaxRowBytes bounds one token's row in WriteKV, MaxBlockStride a block in CopyBlocks (a grid
// of 65535 chunks of 32 KiB).
const (
	MaxGridX       = math.MaxInt32
	MaxGridY       = 65535
	MaxRowBytes    = 1 << 20
	MaxBlockStride = MaxGridY * 256 * 8 * 16
)

// checkBase reports an arena base copy_blocks cannot copy at: 0, or not aligned to its 16-byte
// loads and stores. On the GPU a misaligned launch faults, and the fault ruins the context.
func checkBase(base vmm.Addr) error {
	if base == 0 || base%16 != 0 {
		return invalid("base %#x: 0 or not aligned to 16", uint64(base))
	}
	return nil
}

// checkPairs reports a block id of pairs (pair first onwards) that is negative, or whose block
// does not lie within the address space above base: copy_blocks would compute its address with
// an int64 product that overflows, and copy at the wrapped address.
func checkPairs(pairs []int64, first int, base vmm.Addr, blockStride uint64) error {
	blocks := min(math.MaxInt64, math.MaxUint64-uint64(base)) / blockStride
	for i, id := range pairs {
		if uint64(id) >= blocks {
			return invalid("pair %d: block %d: ids are 0 to %d for blocks of %d bytes at %#x", first+i/2, id, blocks-1, blockStride, uint64(base))
		}
	}
	return nil
}

// checkStride reports a block stride CopyBlocks cannot copy (zero, not a multiple of 16, over
// MaxBlockStride), or pairs that are not pairs.
func checkStride(paired bool, blockStride uint64) error {
	if !paired || blockStride == 0 || blockStride%16 != 0 || blockStride > MaxBlockStride {
		return fmt.Errorf("%w: block stride %d (a multiple of 16 up to %d), whole pairs %v", vmm.ErrInvalidArgument, blockStride, uint64(MaxBlockStride), paired)
	}
	return nil
}

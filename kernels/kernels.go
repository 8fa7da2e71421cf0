package kernels

import (
	"embed"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"
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
	dev vmm.Device
	mod *module // nil: the Go implementation

	mu      sync.Mutex // guards the pair scratch
	scratch *vmm.Pool
	pairCap int
	// read is recorded after every launch that reads the scratch, on its stream (readOn): a
	// launch on another stream waits for it before overwriting the pairs.
	read   cuda.Event
	readOn Stream
}

// module is a loaded CUDA module, shared by the Kernels of one context.
type module struct {
	ctx                            *cuda.Context
	mod                            cuda.Module
	image                          Image
	refs                           int
	copyBlocks, writeKV, attention cuda.Function
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
	m.refs = 1
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
func load(ctx *cuda.Context) (*module, error) {
	img := imageFor(ctx.Ordinal())
	m, err := loadImage(ctx, img)
	if err != nil && img != ImagePTX && errors.Is(err, errNoBinary) {
		m, err = loadImage(ctx, ImagePTX)
	}
	return m, err
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
	}{{&m.copyBlocks, "copy_blocks"}, {&m.writeKV, "write_kv"}, {&m.attention, "paged_attention_decode"}} {
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

// Close releases the scratch buffer and the module reference; the last Kernels of a context
// unloads the module. Closing twice is a no-op.
func (k *Kernels) Close() error {
	if k == nil || k.dev == nil {
		return errNotMade
	}
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
			delete(modules, k.mod.ctx)
			errs = append(errs, k.mod.ctx.ModuleUnload(k.mod.mod))
		}
		modMu.Unlock()
		k.mod = nil
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
// implementation runs synchronously, so its marks are reached when made. Close a Mark when done.
type Mark struct {
	k  *Kernels
	ev cuda.Event
}

// Mark records a point in s's work (a CUDA event on s).
func (k *Kernels) Mark(s Stream) (*Mark, error) {
	if k == nil || k.dev == nil {
		return nil, errNotMade
	}
	if k.mod == nil {
		return &Mark{k: k}, nil
	}
	ev, err := k.mod.ctx.EventCreate(cuda.EventDisableTiming)
	if err != nil {
		return nil, fmt.Errorf("kernels: mark: %w", err)
	}
	if err := k.mod.ctx.EventRecord(ev, cuda.Stream(s)); err != nil {
		k.mod.ctx.EventDestroy(ev)
		return nil, fmt.Errorf("kernels: mark: %w", err)
	}
	return &Mark{k: k, ev: ev}, nil
}

// Wait blocks until the work before the mark is done.
func (mk *Mark) Wait() error {
	if mk == nil || mk.ev == 0 {
		return nil
	}
	return mk.k.mod.ctx.EventSynchronize(mk.ev)
}

// Done reports, without blocking, whether the work before the mark is done.
func (mk *Mark) Done() (bool, error) {
	if mk == nil || mk.ev == 0 {
		return true, nil
	}
	return mk.k.mod.ctx.EventQuery(mk.ev)
}

// Close releases the mark's event; it does not wait for it.
func (mk *Mark) Close() error {
	if mk == nil || mk.ev == 0 {
		return nil
	}
	err := mk.k.mod.ctx.EventDestroy(mk.ev)
	mk.ev = 0
	return err
}

// Synchronize waits for the work queued on s.
func (k *Kernels) Synchronize(s Stream) error {
	if k == nil || k.dev == nil {
		return errNotMade
	}
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
// (src, dst) block ids as vLLM's [N,2] block_mapping, flattened. Destinations must be distinct
// and not be sources of other pairs. On CUDA it stages the pairs in device memory and launches
// once per up to 128k pairs on s, returning once queued.
func (k *Kernels) CopyBlocks(s Stream, base vmm.Addr, pairs []int64, blockStride uint64) error {
	if k == nil || k.dev == nil {
		return errNotMade
	}
	if err := checkStride(len(pairs)%2 == 0, blockStride); err != nil {
		return fmt.Errorf("kernels: copy blocks: %d pair values: %w", len(pairs), err)
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
		if err := k.CopyBlocksDevice(s, base, scratch, n, blockStride); err != nil {
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
// [n,2]): nothing is staged, so it can be captured in a CUDA graph. The Go implementation reads
// the pairs through the device, a chunk at a time. n may be at most MaxGridX.
func (k *Kernels) CopyBlocksDevice(s Stream, base, pairs vmm.Addr, n int, blockStride uint64) error {
	if k == nil || k.dev == nil {
		return errNotMade
	}
	if n < 0 || n > MaxGridX {
		return fmt.Errorf("kernels: copy blocks: %w", &vmm.RangeError{Offset: 0, Size: uint64(n), Limit: MaxGridX + 1})
	}
	if err := checkStride(true, blockStride); err != nil {
		return fmt.Errorf("kernels: copy blocks: %w", err)
	}
	if n == 0 {
		return nil
	}
	if k.mod == nil {
		const chunk = 4096
		host := make([]byte, 16*min(n, chunk))
		p := make([]int64, 2*min(n, chunk))
		for done := 0; done < n; done += chunk {
			c := min(n-done, chunk)
			if err := k.dev.CopyOut(host[:16*c], pairs+vmm.Addr(16*done)); err != nil {
				return fmt.Errorf("kernels: copy blocks: read pairs: %w", err)
			}
			for i := range 2 * c {
				p[i] = int64(binary.LittleEndian.Uint64(host[8*i:]))
			}
			if err := k.CopyBlocks(s, base, p[:2*c], blockStride); err != nil {
				return err
			}
		}
		return nil
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

// WriteKV stores numTokens tokens' K and V of one layer: key and value hold numTokens rows of
// tokenBytes (device addresses), slotMapping numTokens int64 slots (negative: skip); kBase and
// vBase are the layer's K and V bases (kvcache.Manager.LayerBase). tokenBytes is a multiple of
// 16 and at most MaxRowBytes; numTokens at most MaxGridX.
func (k *Kernels) WriteKV(s Stream, kBase, vBase, key, value, slotMapping vmm.Addr, numTokens int, tokenBytes uint64, blockTokens int, blockStride uint64) error {
	if k == nil || k.dev == nil {
		return errNotMade
	}
	if numTokens < 0 || numTokens > MaxGridX || tokenBytes == 0 || tokenBytes%16 != 0 || tokenBytes > MaxRowBytes ||
		blockTokens <= 0 || blockTokens > math.MaxInt32 {
		return fmt.Errorf("kernels: write kv: %w: %d tokens (at most %d) of %d bytes (a multiple of 16, at most %d), %d tokens per block",
			vmm.ErrInvalidArgument, numTokens, MaxGridX, tokenBytes, MaxRowBytes, blockTokens)
	}
	if numTokens == 0 {
		return nil
	}
	if k.mod == nil {
		var slot8 [8]byte
		for t := range numTokens {
			if err := k.dev.CopyOut(slot8[:], slotMapping+vmm.Addr(8*t)); err != nil {
				return fmt.Errorf("kernels: write kv: read slot %d: %w", t, err)
			}
			slot := int64(binary.LittleEndian.Uint64(slot8[:]))
			if slot < 0 {
				continue
			}
			off := vmm.Addr(uint64(slot/int64(blockTokens))*blockStride + uint64(slot%int64(blockTokens))*tokenBytes)
			if err := k.dev.Copy(kBase+off, key+vmm.Addr(uint64(t)*tokenBytes), tokenBytes); err != nil {
				return fmt.Errorf("kernels: write kv: token %d: %w", t, err)
			}
			if err := k.dev.Copy(vBase+off, value+vmm.Addr(uint64(t)*tokenBytes), tokenBytes); err != nil {
				return fmt.Errorf("kernels: write kv: token %d: %w", t, err)
			}
		}
		return nil
	}
	threads := uint32(min(256, (tokenBytes/16+31)/32*32))
	err := k.mod.ctx.LaunchKernel(k.mod.writeKV, [3]uint32{uint32(numTokens), 1, 1}, [3]uint32{threads, 1, 1}, 0, cuda.Stream(s),
		[]unsafe.Pointer{ptr(kBase), ptr(vBase), ptr(key), ptr(value), ptr(slotMapping),
			i64(int64(tokenBytes)), i32(blockTokens), i64(int64(blockStride))})
	if err != nil {
		return fmt.Errorf("kernels: write kv: %w", err)
	}
	return nil
}

// Attention describes one paged decode attention: for each sequence s and query head h,
// Out[s,h,:] = softmax(Scale * Q[s,h,:] . K^T) V over the sequence's SeqLens[s] tokens, read
// through BlockTables (vLLM: int32 [NumSeqs, MaxBlocks]). Q is fp16 [NumSeqs, NumHeads,
// HeadDim], K and V fp16 in the arena layout of one layer (KBase, VBase, BlockStride,
// BlockTokens, KVHeads), Out fp32 [NumSeqs, NumHeads, HeadDim]. All addresses are device
// addresses.
type Attention struct {
	Out, Q, KBase, VBase, BlockTables, SeqLens vmm.Addr
	NumSeqs, MaxBlocks                         int
	NumHeads, KVHeads, HeadDim, BlockTokens    int
	BlockStride                                uint64
	Scale                                      float32
}

func (a Attention) validate() error {
	if a.NumSeqs < 0 || a.NumSeqs > MaxGridX || a.MaxBlocks <= 0 || a.MaxBlocks > math.MaxInt32 ||
		a.NumHeads <= 0 || a.NumHeads > MaxGridY || a.KVHeads <= 0 || a.NumHeads%a.KVHeads != 0 ||
		a.HeadDim <= 0 || a.HeadDim > 1024 || a.BlockTokens <= 0 || a.BlockTokens > math.MaxInt32 || a.BlockStride == 0 {
		return fmt.Errorf("kernels: attention: %w: %+v", vmm.ErrInvalidArgument, a)
	}
	return nil
}

// PagedAttention runs the reference decode attention on s. NumSeqs may be at most MaxGridX and
// NumHeads at most MaxGridY.
func (k *Kernels) PagedAttention(s Stream, a Attention) error {
	if k == nil || k.dev == nil {
		return errNotMade
	}
	if err := a.validate(); err != nil {
		return err
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
	err := k.mod.ctx.LaunchKernel(k.mod.attention, [3]uint32{uint32(a.NumSeqs), uint32(a.NumHeads), 1}, [3]uint32{threads, 1, 1}, shmem, cuda.Stream(s),
		[]unsafe.Pointer{ptr(a.Out), ptr(a.Q), ptr(a.KBase), ptr(a.VBase), ptr(a.BlockTables), ptr(a.SeqLens),
			i32(a.MaxBlocks), i32(a.NumHeads), i32(a.KVHeads), i32(a.HeadDim), i32(a.BlockTokens),
			i64(int64(a.BlockStride)), f32(a.Scale)})
	if err != nil {
		return fmt.Errorf("kernels: attention: %w", err)
	}
	return nil
}

// attentionGo is the Go implementation: the same math in float32 with the same online softmax,
// reading through the device one row at a time, so that its memory does not depend on the
// sizes it is given.
func (k *Kernels) attentionGo(a Attention) error {
	rowBytes := 2 * a.HeadDim
	q, row := make([]byte, rowBytes), make([]byte, rowBytes)
	out := make([]byte, 4*a.HeadDim)
	acc := make([]float32, a.HeadDim)
	var word [4]byte
	read32 := func(addr vmm.Addr) (int32, error) {
		err := k.dev.CopyOut(word[:], addr)
		return int32(binary.LittleEndian.Uint32(word[:])), err
	}
	half := func(b []byte, i int) float32 { return HalfToFloat32(binary.LittleEndian.Uint16(b[2*i:])) }
	group := a.NumHeads / a.KVHeads
	maxLen := int64(a.MaxBlocks) * int64(a.BlockTokens)
	for s := range a.NumSeqs {
		n32, err := read32(a.SeqLens + vmm.Addr(4*s))
		if err != nil {
			return fmt.Errorf("kernels: attention: %w", err)
		}
		n := int64(max(n32, 0))
		if n > maxLen {
			return fmt.Errorf("kernels: attention: sequence %d: %w", s, &vmm.RangeError{Size: uint64(n), Limit: uint64(maxLen) + 1})
		}
		rowOf := a.BlockTables + vmm.Addr(4*int64(s)*int64(a.MaxBlocks))
		for h := range a.NumHeads {
			kvh := h / group
			if err := k.dev.CopyOut(q, a.Q+vmm.Addr(int64(s*a.NumHeads+h)*int64(rowBytes))); err != nil {
				return fmt.Errorf("kernels: attention: %w", err)
			}
			clear(acc)
			m, sum := float32(math.Inf(-1)), float32(0)
			var blk int32
			for t := range n {
				if t%int64(a.BlockTokens) == 0 {
					if blk, err = read32(rowOf + vmm.Addr(4*(t/int64(a.BlockTokens)))); err != nil {
						return fmt.Errorf("kernels: attention: %w", err)
					}
				}
				off := vmm.Addr(uint64(blk)*a.BlockStride + uint64(((t%int64(a.BlockTokens))*int64(a.KVHeads)+int64(kvh))*int64(rowBytes)))
				if err := k.dev.CopyOut(row, a.KBase+off); err != nil {
					return fmt.Errorf("kernels: attention: %w", err)
				}
				dot := float32(0)
				for d := range a.HeadDim {
					dot += half(q, d) * half(row, d)
				}
				score := dot * a.Scale
				if score > m { // rescale what was accumulated under the old maximum
					c := float32(math.Exp(float64(m - score)))
					for d := range acc {
						acc[d] *= c
					}
					sum *= c
					m = score
				}
				p := float32(math.Exp(float64(score - m)))
				sum += p
				if err := k.dev.CopyOut(row, a.VBase+off); err != nil {
					return fmt.Errorf("kernels: attention: %w", err)
				}
				for d := range a.HeadDim {
					acc[d] += p * half(row, d)
				}
			}
			for d := range a.HeadDim {
				v := float32(0)
				if n > 0 {
					v = acc[d] / sum
				}
				binary.LittleEndian.PutUint32(out[4*d:], math.Float32bits(v))
			}
			if err := k.dev.CopyIn(a.Out+vmm.Addr(int64(s*a.NumHeads+h)*int64(4*a.HeadDim)), out); err != nil {
				return fmt.Errorf("kernels: attention: %w", err)
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

// checkStride reports a block stride CopyBlocks cannot copy (zero, not a multiple of 16, over
// MaxBlockStride), or pairs that are not pairs.
func checkStride(paired bool, blockStride uint64) error {
	if !paired || blockStride == 0 || blockStride%16 != 0 || blockStride > MaxBlockStride {
		return fmt.Errorf("%w: block stride %d (a multiple of 16 up to %d), whole pairs %v", vmm.ErrInvalidArgument, blockStride, uint64(MaxBlockStride), paired)
	}
	return nil
}

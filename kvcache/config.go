package kvcache

import (
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/internal/names"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// Config is a manager's model geometry and arena settings. It is pure data: Validate checks it
// and the Block*/Page*/Addr methods derive the layout; binding to a device happens in New.
//
// # Arena layout
//
// Block b holds, for every layer l, BlockTokens tokens of K (kv=0: KVHeads*HeadDim elements in
// NHD order, [block_size, num_kv_heads, head_dim]) and then of V (kv=1: KVHeads*VHeadDim
// elements; none when KOnly). All of a block's data is contiguous, layers and K|V interleaved:
//
//	Addr(l, kv, b) = base + b*BlockStride() + l*LayerStride() + kv*BlockBytes()
//	LayerStride()  = BlockBytes() + VBlockBytes()
//	BlockStride()  = Layers * LayerStride() + BlockPadding
//
// So each layer sees the usual per-layer [num_blocks, block_size, num_kv_heads, head_dim] view,
// with a per-layer base LayerBase(l, kv) and a block stride of BlockStride() common to every
// layer; block ids are the same for every layer. (With V like K this is the familiar
// (2l+kv)*BlockBytes().) A recurrent-state arena (StateBytes) holds one state per sequence
// instead: a block is every layer's state, LayerStride() = StateBytes. A page of
// PageSize bytes holds BlocksPerPage() whole blocks of every layer, so ONE driver mapping grows
// every layer's K and V by one page index: 31-36x cheaper than mapping 64 per-layer granules for
// a 32-layer model on an H100 (docs/performance.md). Copying a block between ids is one
// contiguous copy of BlockStride() bytes.
type Config struct {
	Layers      int // transformer layers
	KVHeads     int // key/value heads per layer
	HeadDim     int // elements per head
	ElemSize    int // bytes per element (2 for fp16/bf16)
	BlockTokens int // tokens per block (vLLM's block_size)

	// VHeadDim is V's elements per head where they differ from K's; 0 means HeadDim.
	VHeadDim int
	// KOnly stores K and no V (MLA's latent): VHeadDim must be 0, and kv=1 has no view.
	KOnly bool
	// Window, Sinks and Chunk say which earlier tokens the layers read, for a layer group that
	// does not read them all (see LayerGroup): a sliding window of Window tokens and the first
	// Sinks tokens, or the current chunk of Chunk tokens. Blocks that fall wholly out of reach
	// as tokens are appended are freed; the sequence keeps their places as NullBlock. 0: full
	// attention.
	Window, Sinks, Chunk int
	// StateBytes makes the arena one of recurrent states (Gated DeltaNet, Mamba): one block of
	// StateBytes per layer for each sequence, taken by its first append and kept whatever its
	// length; KVHeads, HeadDim, VHeadDim and ElemSize are then unused and BlockTokens is set to
	// MaxSequenceTokens. A fork shares the state until either appends (which copies it).
	StateBytes uint64
	// CheckpointTokens are the tokens between a recurrent-state arena's checkpoints (0: none).
	// MarkWritten of a keyed sequence at a positive multiple of it copies the sequence's state
	// into a block of the arena's own, cached under the key of the sequence's first n tokens in
	// blocks of CheckpointTokens and held by no sequence (idle, evicted as any idle cached
	// block). StartSequence then resumes a prompt with that prefix from a copy of the latest
	// such checkpoint. Only with StateBytes, and not with a host prefix cache (HostPrefixCache):
	// a swap moves the live state, and checkpoints stay on the device.
	CheckpointTokens int
	// BlockPadding is unused bytes at the end of every block, a multiple of 16, so that a page of
	// whole granules holds whole blocks whatever a block's size (a layer group's arena, whose
	// blocks are 4.3 MiB for DeepSeek's 61 MLA layers, pads them to 4.375 MiB: 16 to a 70 MiB
	// page). 0 for none.
	BlockPadding uint64

	// Capacity is the virtual size of the arena in bytes, rounded up to whole pages; 0 means 4x
	// the device's memory, clamped to MaxPages pages and MaxBlocks blocks. It costs no physical
	// memory.
	Capacity uint64
	// PageSize is the mapping unit in bytes; 0 means 2*Layers*granularity (one granule per layer
	// and K|V, as a per-layer allocator would map). It must be a multiple of the device
	// granularity and of BlockStride().
	PageSize uint64
	// ReservePages is how many mapped, entirely free pages a background goroutine keeps ready, so
	// that an AppendTokens crossing into a new page finds one without waiting for the driver.
	// 0 means 1; negative means none.
	ReservePages int
	// HighWatermark is how many entirely free pages stay mapped (reused with no driver call);
	// beyond it free pages are unmapped from the top of the arena. 0 means 2*ReservePages+2.
	HighWatermark int
	// MemoryLimit bounds the bytes of mapped pages; 0 means no bound but the device's memory.
	MemoryLimit uint64
	// PrefixCacheBytes bounds the bytes of cached blocks no sequence holds (idle blocks, kept
	// for prefix hits). Within it, growth maps memory rather than evicting them (while memory
	// pressure — MemoryLimit, a shared budget, the device — still evicts them before other models
	// are asked). Beyond it, idle blocks live only in otherwise-free memory: they are evicted
	// before a page is mapped, and pages holding nothing else are evicted whole and returned.
	// 0 means only otherwise-free memory. Eviction works by whole pages where it can, because
	// memory goes back by the page: blocks evicted one by one from scattered pages return
	// nothing (kvcached #359 pinned 4x its bound that way).
	PrefixCacheBytes uint64
	// HostBlocks is the size of the host tier in blocks: pinned host memory, mapped after the
	// arena's pages in its reservation (whole pages of it), that SwapOut moves sequences' blocks
	// to and SwapIn brings them back from. 0 means none. A window or chunk arena moves only the
	// blocks its sequences still hold; a recurrent arena moves each sequence's state.
	HostBlocks int
	// HostPrefixCache keeps the prefix cache's blocks in the host tier too: blocks that go idle
	// are written back to host blocks the swaps do not use, and a prompt whose prefix the
	// device no longer holds but the host does gets it copied back (hostcache.go). Needs
	// HostBlocks; not for a recurrent arena with checkpoints (ErrNotSupported). A window or
	// chunk arena writes back the blocks its sequences still hold; on its own it serves only
	// prefixes it holds whole, from the first block, as its device cache does, while in a
	// Hybrid a start fetches only the blocks the window reads (HybridConfig.HostCacheTokens).
	HostPrefixCache bool
	// HostSwapBlocks are host blocks kept for swapped-out sequences. The host prefix cache
	// never takes them: it holds at most HostBlocks-HostSwapBlocks blocks. The swap slots not in
	// use are HostSwapBlocks less the host blocks swapped-out sequences hold. The cache takes a
	// free block only while more blocks are free than that, and evicts its own least recently
	// used otherwise. A SwapOut takes free blocks first, then the cache's least recently used
	// idle blocks, so swaps may use more than HostSwapBlocks where the cache leaves room. A
	// SwapOut of no more blocks than the swap slots not in use never fails for lack of host
	// blocks, whatever the cache holds, blocks held for the tiers included. It lies in [0,
	// HostBlocks]. 0 keeps no block from the cache: swaps and the cache share the whole tier.
	// Without HostPrefixCache every host block serves swaps and it changes nothing.
	HostSwapBlocks int
	// KeyScheme says how cached blocks are keyed: the zero value is pagedkv's SHA-256 chain
	// (prefix.Root, prefix.Keys); with VLLM set, vLLM's sha256_cbor block hashes
	// (prefix.VLLMKeys), so that a router sees one key space over vLLM and pagedkv replicas and
	// its keys are accepted as Prompt.Keys. The KV events then carry vLLM's own block hashes.
	KeyScheme prefix.Scheme
	// Tiers are stores below the host tier, fastest first (a local disk, then a store shared by
	// replicas: packages tier/disk and tier/redis). Every block the host prefix cache stores is
	// written to them behind the append path, and StartSequence looks in them, in order, for a
	// prompt's blocks that neither the device nor the host holds (tiers.go). The manager
	// borrows the stores: the caller closes them after the manager. Needs HostPrefixCache.
	Tiers []Tier
	// TierTimeout bounds each call to a tier; 0 means DefaultTierTimeout. A call that fails or
	// passes it is a miss, counted in PrefixStats.Tiers.
	TierTimeout time.Duration
	// WaitForWrites makes a filled block a prefix hit for other sequences only once the runtime
	// has said that its K/V is written (MarkWritten). Without it a block is cached the moment it
	// fills, before the kernel that writes its K/V has run: a runtime that prefills in chunks, or
	// runs requests on several goroutines or streams, must then order each sequence's writes
	// before any later StartSequence of the same prefix (docs/integration.md, "When a block
	// becomes a hit").
	WaitForWrites bool
	// Strict turns what the manager would otherwise do silently into errors: an append to a
	// sequence that does not exist is ErrUnknownSequence (create it with AddSequence or
	// StartSequence; without Strict the append creates it, so a late append after FreeSequence
	// would quietly hold blocks again), and AppendTokens without ids on a keyed sequence is
	// ErrNeedsTokenIDs (without Strict the sequence stops being cached from there on). Both are
	// counted in Stats.Warnings either way.
	Strict bool
	// NoBackground turns the reserve goroutine off: pages are mapped when an append needs one and
	// the watermarks are applied by Settle. For deterministic tests and single-threaded use.
	NoBackground bool
}

// Limits of one arena; Validate and New enforce them.
const (
	// MaxBlocks is the most blocks one arena holds: block ids are int32 in every table format.
	MaxBlocks = math.MaxInt32
	// MaxPages bounds the pages of one arena (2 TiB of 2 MiB pages), so that its bookkeeping stays
	// small whatever Capacity says. A default Capacity is clamped to it.
	MaxPages = 1 << 20
	// MaxSequenceTokens is the most tokens one sequence may hold: seq_lens are int32.
	MaxSequenceTokens = math.MaxInt32
	// MaxBlockStride bounds BlockStride (1 TiB): a block bigger than that is a mistake, and the
	// bound keeps every address computation of a valid arena far from overflowing.
	MaxBlockStride = 1 << 40
)

// ConfigError reports a Config setting, or a size derived from the settings, that cannot be
// used: Field names it, Value is what it is (nil where computing it overflowed) and Reason what
// it must be. It matches ErrInvalidArgument.
type ConfigError struct {
	Field  string
	Value  any
	Reason string
}

// Error describes the failure with its numbers.
func (e *ConfigError) Error() string {
	if e == nil {
		return "<nil>"
	}
	if e.Value == nil {
		return fmt.Sprintf("invalid argument: kvcache config: %s overflows: %s", e.Field, e.Reason)
	}
	return fmt.Sprintf("invalid argument: kvcache config: %s = %v: %s", e.Field, e.Value, e.Reason)
}

// Is reports whether target is ErrInvalidArgument.
func (e *ConfigError) Is(target error) bool { return e != nil && target == ErrInvalidArgument }

// Validate checks the geometry and the settings that need no device; the error is a
// *ConfigError (ErrInvalidArgument) or a *vmm.AlignmentError. Every size the Config derives
// (TokenBytes, BlockBytes, BlockStride, BlocksPerPage) is exact for a Config that passes it.
func (c Config) Validate() error {
	if c.StateBytes > 0 {
		return c.validateState()
	}
	if c.CheckpointTokens != 0 {
		return &ConfigError{Field: "CheckpointTokens", Value: c.CheckpointTokens, Reason: "only a recurrent-state arena (StateBytes) keeps checkpoints"}
	}
	for _, f := range []struct {
		name string
		v    int
	}{{"Layers", c.Layers}, {"KVHeads", c.KVHeads}, {"HeadDim", c.HeadDim}, {"ElemSize", c.ElemSize}, {"BlockTokens", c.BlockTokens}} {
		if f.v <= 0 || f.v > math.MaxInt32 {
			return &ConfigError{Field: f.name, Value: f.v, Reason: fmt.Sprintf("must lie in [1, %d]", math.MaxInt32)}
		}
	}
	if c.VHeadDim < 0 || c.VHeadDim > math.MaxInt32 || c.KOnly && c.VHeadDim != 0 {
		return &ConfigError{Field: "VHeadDim", Value: c.VHeadDim, Reason: fmt.Sprintf("must lie in [0, %d], and be 0 with KOnly", math.MaxInt32)}
	}
	if _, ok := checked.MulN(MaxBlockStride, c.Layers, c.BlockTokens, c.KVHeads, c.HeadDim+c.vHeadDim(), c.ElemSize); !ok {
		return &ConfigError{Field: "BlockStride", Reason: fmt.Sprintf("Layers*BlockTokens*KVHeads*(HeadDim+VHeadDim)*ElemSize must be at most %d", uint64(MaxBlockStride))}
	}
	if err := c.validateReach(); err != nil {
		return err
	}
	return c.validateArena()
}

// validateReach checks the window, sinks and chunk.
func (c Config) validateReach() error {
	switch {
	case c.Window < 0 || c.Chunk < 0 || c.Sinks < 0:
		return &ConfigError{Field: "Window/Sinks/Chunk", Value: fmt.Sprint(c.Window, "/", c.Sinks, "/", c.Chunk), Reason: "must not be negative"}
	case c.Window > MaxSequenceTokens || c.Chunk > MaxSequenceTokens || c.Sinks > MaxSequenceTokens:
		// a sequence never holds more, and the length at which a block falls out of reach
		// (nextDrop) must not wrap
		return &ConfigError{Field: "Window/Sinks/Chunk", Value: fmt.Sprint(c.Window, "/", c.Sinks, "/", c.Chunk),
			Reason: fmt.Sprintf("must be at most MaxSequenceTokens (%d)", MaxSequenceTokens)}
	case c.Window > 0 && c.Chunk > 0:
		return &ConfigError{Field: "Chunk", Value: c.Chunk, Reason: "a layer group has a sliding window or chunks, not both"}
	case c.Sinks > 0 && c.Window == 0:
		return &ConfigError{Field: "Sinks", Value: c.Sinks, Reason: "sink tokens belong to a sliding window"}
	}
	return nil
}

// validateState checks a recurrent-state arena: a state of StateBytes, a positive multiple of
// 16 bytes, for each of Layers layers; no window.
func (c Config) validateState() error {
	if c.Layers <= 0 || c.Layers > math.MaxInt32 {
		return &ConfigError{Field: "Layers", Value: c.Layers, Reason: fmt.Sprintf("must lie in [1, %d]", math.MaxInt32)}
	}
	if c.StateBytes%16 != 0 || c.StateBytes > MaxBlockStride/uint64(c.Layers) {
		return &ConfigError{Field: "StateBytes", Value: c.StateBytes, Reason: fmt.Sprintf("a multiple of 16 bytes, at most %d over all %d layers", uint64(MaxBlockStride), c.Layers)}
	}
	if c.Window != 0 || c.Chunk != 0 || c.Sinks != 0 || c.KOnly || c.VHeadDim != 0 {
		return &ConfigError{Field: "StateBytes", Value: c.StateBytes, Reason: "a recurrent state has no window, chunk, sinks or K/V layout"}
	}
	if c.CheckpointTokens < 0 || c.CheckpointTokens > MaxSequenceTokens {
		return &ConfigError{Field: "CheckpointTokens", Value: c.CheckpointTokens, Reason: fmt.Sprintf("must lie in [0, %d]", MaxSequenceTokens)}
	}
	if c.CheckpointTokens > 0 && c.HostPrefixCache {
		// Swaps move the live state like a block; checkpoints stay on the device.
		return fmt.Errorf("kvcache config: %w: a host prefix cache (HostPrefixCache) for a recurrent arena with checkpoints", ErrNotSupported)
	}
	return c.validateArena()
}

// validateArena checks the settings that do not depend on what a block holds.
func (c Config) validateArena() error {
	if c.BlockPadding%16 != 0 || c.BlockPadding > MaxBlockStride/2 {
		return &ConfigError{Field: "BlockPadding", Value: c.BlockPadding, Reason: fmt.Sprintf("a multiple of 16 bytes, at most %d", uint64(MaxBlockStride/2))}
	}
	if c.PageSize != 0 && c.PageSize%c.BlockStride() != 0 {
		return fmt.Errorf("kvcache config: %w", &vmm.AlignmentError{What: "page size", Value: c.PageSize, Align: c.BlockStride()})
	}
	if c.PageSize != 0 && c.PageSize/c.BlockStride() > MaxBlocks {
		return &ConfigError{Field: "PageSize", Value: c.PageSize, Reason: fmt.Sprintf("holds more than %d blocks", MaxBlocks)}
	}
	if c.HighWatermark < 0 {
		return &ConfigError{Field: "HighWatermark", Value: c.HighWatermark, Reason: "must not be negative"}
	}
	if c.HostBlocks < 0 || c.HostBlocks > MaxBlocks {
		return &ConfigError{Field: "HostBlocks", Value: c.HostBlocks, Reason: fmt.Sprintf("must lie in [0, %d]", MaxBlocks)}
	}
	if c.HostSwapBlocks < 0 || c.HostSwapBlocks > c.HostBlocks {
		return &ConfigError{Field: "HostSwapBlocks", Value: c.HostSwapBlocks, Reason: fmt.Sprintf("must lie in [0, HostBlocks %d]", c.HostBlocks)}
	}
	if c.HostPrefixCache && c.HostBlocks == 0 {
		return &ConfigError{Field: "HostPrefixCache", Value: true, Reason: "needs a host tier (HostBlocks)"}
	}
	if len(c.Tiers) > 0 && !c.HostPrefixCache {
		return &ConfigError{Field: "Tiers", Value: len(c.Tiers), Reason: "need the host prefix cache (HostPrefixCache), through which blocks move"}
	}
	for i, t := range c.Tiers {
		if t.Store == nil {
			return &ConfigError{Field: "Tiers", Value: i, Reason: "a nil Store"}
		}
		if err := names.Check("tier medium", t.Medium); err != nil {
			return &ConfigError{Field: "Tiers", Value: t.Medium, Reason: fmt.Sprintf("tier %d: %v", i, err)}
		}
		for j := range i {
			if strings.EqualFold(c.Tiers[j].Medium, t.Medium) {
				return &ConfigError{Field: "Tiers", Value: t.Medium, Reason: fmt.Sprintf("tiers %d and %d share a medium", j, i)}
			}
		}
	}
	if c.TierTimeout < 0 {
		return &ConfigError{Field: "TierTimeout", Value: c.TierTimeout, Reason: "must not be negative"}
	}
	if ks := c.KeyScheme; !ks.VLLM && (ks.Seed != "" || len(ks.LoRANames) > 0) {
		return &ConfigError{Field: "KeyScheme", Value: ks.Seed, Reason: "a seed or LoRA names mean nothing without VLLM"}
	}
	return checkLoRANames("KeyScheme.LoRANames", c.KeyScheme.LoRANames)
}

// checkLoRANames refuses what a map of adapter ids to vLLM's lora_name cannot mean: a name
// for adapter 0, the base model, which has none; and an empty name, which vLLM hashes as a
// LoRA's ([""] in the extra keys) but a key without a name would merge with the base model's.
func checkLoRANames(field string, names map[uint64]string) error {
	for id, name := range names {
		switch {
		case id == 0:
			return &ConfigError{Field: field, Value: name, Reason: "adapter 0 is the base model and has no LoRA name"}
		case name == "":
			return &ConfigError{Field: field, Value: id, Reason: "an adapter's LoRA name must not be empty (its blocks would share the base model's keys)"}
		}
	}
	return nil
}

// withDefaults fills the zero settings for a device of the given granularity and memory, and
// checks what depends on them: the page size against the granularity, and the arena's pages and
// blocks against MaxPages and MaxBlocks (an explicit Capacity beyond them is an error, a
// default one is clamped).
func (c Config) withDefaults(gran, devMem uint64) (Config, error) {
	if gran == 0 {
		return c, &ConfigError{Field: "device granularity", Value: gran, Reason: "must be positive"}
	}
	if c.StateBytes > 0 {
		c.BlockTokens = MaxSequenceTokens // one block, the state, whatever the length
	}
	if c.PageSize == 0 {
		ps, ok := checked.Mul(2*uint64(c.Layers), gran)
		if !ok {
			return c, &ConfigError{Field: "PageSize (default 2*Layers*granularity)", Reason: "set PageSize"}
		}
		c.PageSize = ps
		if c.PageSize%c.BlockStride() != 0 {
			return c, &ConfigError{Field: "PageSize (default 2*Layers*granularity)", Value: c.PageSize,
				Reason: fmt.Sprintf("holds no whole number of %d-byte blocks; set PageSize", c.BlockStride())}
		}
		if c.PageSize/c.BlockStride() > MaxBlocks {
			return c, &ConfigError{Field: "PageSize (default 2*Layers*granularity)", Value: c.PageSize, Reason: fmt.Sprintf("holds more than %d blocks; set PageSize", MaxBlocks)}
		}
	}
	if c.PageSize%gran != 0 {
		return c, fmt.Errorf("kvcache config: %w", &vmm.AlignmentError{What: "page size", Value: c.PageSize, Align: gran})
	}
	bpp := c.PageSize / c.BlockStride()
	maxPages := min(uint64(MaxPages), MaxBlocks/bpp)
	if c.Capacity == 0 {
		capacity, ok := checked.Mul(4, devMem)
		if !ok {
			capacity = math.MaxUint64
		}
		c.Capacity = min(capacity/c.PageSize, maxPages) * c.PageSize
		if c.Capacity == 0 {
			c.Capacity = c.PageSize
		}
	}
	pages := c.Capacity / c.PageSize
	if c.Capacity%c.PageSize != 0 {
		pages++
	}
	if pages > maxPages {
		return c, &ConfigError{Field: "Capacity", Value: c.Capacity,
			Reason: fmt.Sprintf("needs %d pages of %d bytes; an arena has at most %d pages and %d blocks", pages, c.PageSize, MaxPages, MaxBlocks)}
	}
	c.Capacity = pages * c.PageSize
	if hostPages := (uint64(c.HostBlocks) + bpp - 1) / bpp; (pages+hostPages)*bpp > MaxBlocks {
		return c, &ConfigError{Field: "HostBlocks", Value: c.HostBlocks,
			Reason: fmt.Sprintf("with the arena's %d blocks, more than the %d block ids there are", pages*bpp, MaxBlocks)}
	}
	if c.MemoryLimit > 0 && c.MemoryLimit < c.PageSize {
		return c, &ConfigError{Field: "MemoryLimit", Value: c.MemoryLimit,
			Reason: fmt.Sprintf("is less than one page of %d bytes (PageSize), so the arena could hold no block", c.PageSize)}
	}
	switch {
	case c.ReservePages == 0:
		c.ReservePages = 1
	case c.ReservePages < 0:
		c.ReservePages = 0
	}
	c.ReservePages = min(c.ReservePages, int(pages))
	if c.HighWatermark == 0 {
		c.HighWatermark = 2*c.ReservePages + 2
	}
	if c.HighWatermark < c.ReservePages {
		c.HighWatermark = c.ReservePages
	}
	return c, nil
}

// The sizes below are exact for a Config that passed Validate. On any other Config they are
// unchecked arithmetic: they never panic, and may wrap.

// TokenBytes returns the bytes of one token's K in one layer (0 in a recurrent-state arena).
func (c Config) TokenBytes() uint64 {
	if c.StateBytes > 0 {
		return 0
	}
	return uint64(c.KVHeads) * uint64(c.HeadDim) * uint64(c.ElemSize)
}

// VTokenBytes returns the bytes of one token's V in one layer (0 with KOnly).
func (c Config) VTokenBytes() uint64 {
	if c.StateBytes > 0 {
		return 0
	}
	return uint64(c.KVHeads) * uint64(c.vHeadDim()) * uint64(c.ElemSize)
}

// vHeadDim is V's elements per head: VHeadDim, or HeadDim when that is 0, or none with KOnly.
func (c Config) vHeadDim() int {
	switch {
	case c.KOnly:
		return 0
	case c.VHeadDim > 0:
		return c.VHeadDim
	}
	return c.HeadDim
}

// BlockBytes returns the bytes of one block's K in one layer.
func (c Config) BlockBytes() uint64 { return uint64(c.BlockTokens) * c.TokenBytes() }

// VBlockBytes returns the bytes of one block's V in one layer (0 with KOnly).
func (c Config) VBlockBytes() uint64 { return uint64(c.BlockTokens) * c.VTokenBytes() }

// LayerStride returns the bytes of one layer within a block: its K and V, or its state.
func (c Config) LayerStride() uint64 {
	if c.StateBytes > 0 {
		return c.StateBytes
	}
	return c.BlockBytes() + c.VBlockBytes()
}

// BlockStride returns the distance between consecutive blocks: all layers' K and V (or
// states) of one block.
func (c Config) BlockStride() uint64 { return uint64(c.Layers)*c.LayerStride() + c.BlockPadding }

// BlocksPerPage returns how many blocks one page holds (0 while PageSize is not set).
func (c Config) BlocksPerPage() int {
	stride := c.BlockStride()
	if stride == 0 {
		return 0
	}
	return int(min(c.PageSize/stride, MaxBlocks))
}

// LayerOffset returns the offset of layer l's K (kv=0) or V (kv=1) within every block.
//
// Address arithmetic (LayerOffset, Offset, and Manager.LayerBase, Manager.BlockAddr and
// Layout.Addr built on them) is unchecked, like unsafe.Add: these are called in launch code
// for every layer, and a layer outside [0, Layers), a kv other than 0 or 1, or a block outside
// the arena gives an address outside the arena, which the host backend's data calls refuse
// with ErrNotMapped and a kernel would fault on. They never panic.
func (c Config) LayerOffset(layer, kv int) uint64 {
	return uint64(layer)*c.LayerStride() + uint64(kv)*c.BlockBytes()
}

// Offset returns the arena offset of layer l's K or V of block b (unchecked; see LayerOffset).
func (c Config) Offset(layer, kv int, block int32) uint64 {
	return uint64(block)*c.BlockStride() + c.LayerOffset(layer, kv)
}

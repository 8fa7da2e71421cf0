package kvcache

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/sequence"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/vmm"
)

// HybridConfig configures a Hybrid: a model's Geometry and what every group's arena shares.
type HybridConfig struct {
	Geometry Geometry
	// Limit bounds the physical bytes all groups map together (one budget); 0 means the
	// device's memory. With a Ledger the ledger's limit replaces it.
	Limit uint64
	// Ledger, when set, shares the limit with the models of other processes on the same GPU
	// (SharedConfig.Ledger): every group joins it as a member under its name (see Name), draws
	// its pages from it, and gives back free and cached pages (with CompactOnPressure,
	// compacts) when another process is short. The Hybrid borrows the ledger: close the Hybrid
	// before the ledger.
	Ledger *ledger.Ledger
	// Name names the groups in the Hybrid's pool and, with a Ledger, among the members of every
	// process: group i is "Name-i", "group-i" when Name is empty. Names are unique on a ledger,
	// so give each process's Hybrid a name of its own there (a second "group-0" is ErrExists).
	Name string
	// Capacity is each group's virtual reservation in bytes (0: as Config.Capacity's default).
	Capacity uint64
	// PrefixCacheBytes bounds each group's idle cached blocks, as Config.PrefixCacheBytes.
	PrefixCacheBytes uint64
	// CompactOnPressure lets a group short of memory compact the others (SharedConfig's).
	CompactOnPressure bool
	// WaitForWrites, Strict and NoBackground apply to every group, as in Config, and so do
	// ReservePages and HighWatermark (in each group's pages), but for one thing: a group's
	// reserve goroutine returns the free pages beyond HighWatermark once no append has needed
	// them for a second, not at once, so that the pages one batch frees and the next maps again
	// stay mapped in every group. Memory the model stops using goes back within two seconds;
	// Settle and Sleep return it at once, and a group keeps no more beyond HighWatermark than
	// the budget has room for besides.
	WaitForWrites, Strict, NoBackground bool
	ReservePages, HighWatermark         int
	// KeyScheme keys every group's blocks (Config.KeyScheme); Prompt.Keys are for the first
	// attention group's block size.
	KeyScheme prefix.Scheme
	// HostTokens sizes a host tier for SwapOut and SwapIn (0: none): each attention group, a
	// window or a chunk too, gets ceil(HostTokens / its BlockTokens) host blocks, room for
	// HostTokens tokens of swapped-out sequences in every group.
	HostTokens int
	// HostSequences sizes each recurrent group's host tier, in states: one per swapped-out
	// sequence (a fork not yet written shares its parent's). It must be positive with
	// HostTokens when the model has a recurrent group, and 0 without HostTokens.
	HostSequences int
	// HostCacheTokens gives every attention group a host prefix cache (Config.HostPrefixCache)
	// of ceil(HostCacheTokens / its BlockTokens) host blocks beyond HostTokens' swap blocks
	// (0: none). A group's idle cached blocks are written back there, and a start brings back
	// from it the blocks a longer hit needs (a window's only those its next token reads), so
	// that what the devices evicted is not computed again. A recurrent group has none: its
	// checkpoints stay on the device.
	HostCacheTokens int
	// Tiers gives an attention group stores below its host prefix cache (Config.Tiers: a
	// local disk, a store shared by replicas), where HostCacheTokens is set; nil: none. NewHybrid
	// calls it once for each attention group, in order, with what the group's blocks are as
	// stored: the bytes of one block and a fingerprint of the group's own (its layout, layers
	// and attention: two groups of one shape get two), to open its stores with. A tier/disk
	// store needs a directory of the group's own; tier/redis stores of several groups may share
	// a server, as their keys carry the fingerprint. It returns the group's tiers, none for a
	// group without; an error fails NewHybrid (a *GroupOpError naming the group). The caller
	// owns every store it returned and closes it after the Hybrid, or after NewHybrid failed. A
	// recurrent group has no tiers: its checkpoints stay on the device, and a start that finds
	// none cached there asks no tier. A start asks a group's tiers for the blocks of the prompt
	// that neither its device nor its host holds: an unbounded group its leading run, a window
	// or chunk group only what its next token would read at the length those runs allow; a
	// group's TierStats.HitTokens counts those its hit reads. A fetch never evicts a group's
	// host blocks of the hit it lengthens. A model whose attention groups are all windows or
	// chunks has no unbounded run to bound the hit: its groups' leading runs in their tiers
	// (Store.Has, no block read) bound it, unless what the prompt's full length reads is held
	// (a repeated prompt), so a store that dropped a prompt's first blocks and kept later ones
	// serves less than it holds. On one device only (NewHybridMulti over several refuses
	// Tiers).
	Tiers func(group int, g LayerGroup, fp tier.Fingerprint, blockBytes int) ([]Tier, error)
	// TierTimeout bounds each call to a group's tiers, as Config.TierTimeout (0:
	// DefaultTierTimeout).
	TierTimeout time.Duration
}

// Hybrid is the cache of a model whose layers do not all store the same thing: a set of layer
// groups (full attention, sliding windows, chunks, MLA latents, recurrent states), each its own
// elastic arena with its own block size and block table, all under one physical budget. One
// sequence id spans every group. Appends, starts, forks, truncations and frees act on every
// group at once, all or nothing: a group that cannot take its part (out of memory, a driver
// failing) leaves every group as it was.
//
// Group(i) returns group i's Manager, for what is read per group: its block table (ExportVLLM,
// ExportFlashInfer, DeviceTables), Layout, Shards, Blocks, Slots, Stats. Change sequences through
// the Hybrid: a group's Manager refuses the calls that change sequences (see Group). Window and chunk groups drop blocks
// that fall out of reach (NullBlock in their tables); a recurrent group holds one state block per
// sequence (its table's one entry is the state's index), copied on the first append after a
// fork.
//
// A prefix hit is the longest length every group serves, in whole blocks of every group: a
// group of full attention or MLA needs all its blocks of the prefix, a window or chunk group the
// blocks its next token reads, and a recurrent group a state at that position. A recurrent
// group keeps states only with LayerGroup.Checkpoints set; without, nothing hits.
//
// Checkpoints (vLLM's "align" mode): the runtime aligns its prefill chunks to Checkpoints and
// calls MarkWritten(seq, n) once its kernels have produced the state after n tokens. At a
// positive multiple of Checkpoints, for a keyed sequence, the recurrent group copies the live
// state into a block of its own arena (a device copy) and caches it under the key of the first
// n tokens, chained in blocks of Checkpoints tokens in the sequence's namespace. The copy is
// held by no sequence and evicted as any idle cached block (PrefixCacheBytes, otherwise-free
// memory). A mark off a multiple, or one that skips past a multiple, makes no checkpoint there:
// a later hit is shorter, never wrong. No memory for a checkpoint skips it, and so does a mark
// while the Hybrid sleeps (counted in PrefixStats.Checkpoints); a driver failure is an error
// and leaves every group as it was.
// StartSequence then hits up to the latest cached checkpoint that every other group also
// serves, and the recurrent group's sequence starts with a fresh state holding a copy of that
// checkpoint, which stays cached. A start that cannot take or copy that state fails, and every
// group is as it was. Fork, Truncate and FreeSequence leave checkpoints cached: they are
// content-addressed. A recurrent group publishes no KV events: a checkpoint is no K/V block a
// router could place.
//
// Sleep, Wake, a limit shared with other processes (HybridConfig.Ledger) and swaps to the host
// tier (HybridConfig.HostTokens, SwapOut, SwapIn) act on every group too. Sleep sleeps each
// group in turn and reports each group's failure; a swap is all or nothing across groups: each
// group checks and reserves, then every group queues its copy, then all commit. A window or
// chunk group swaps only the blocks it still holds, a recurrent group each sequence's live
// state; its checkpoints stay cached on the device.
//
// Safe for concurrent use: the groups share one lock, so a decode step across all of them takes
// it once. The Hybrid owns its groups' managers and borrows the Device and the Ledger.
type Hybrid struct {
	geom   Geometry
	pool   *SharedPool
	groups []*Manager
	mu     *sync.Mutex  // every group's lock
	feed   *prefix.Feed // every group's KV events (Subscribe)
	scales *scaleTable  // the fp8 groups' scales in device memory (Scales); nil without fp8

	// guarded by mu: each sequence's record (one lookup per step), the transactions of the
	// operation under way, and scratch
	index   *hybridIndex
	txs     []appendTx
	scratch []int64
	found   []*sequence.Sequence // the sequence in each group, as fast found them
	finders []hitFinder          // each group's lookups during a start
	marks   []markTx             // each group's part of a MarkWritten
	admits  []admitPart          // each group's part of an Admit
	resumes []resumeTx           // each group's resumed state during a start
	fetched [][]int32            // each group's blocks a start fetched from its host cache (hybridhost.go)
	swaps   []swapTx             // each group's part of a SwapOut or SwapIn

	// lanes are what the fast path reads of each group, in one array (see lane)
	lanes []lane

	// chainOf[i] is the first group before group i with its block size (both attention
	// groups), whose keys group i takes instead of hashing the same blocks again; -1 if none.
	chainOf []int

	// starts are the scratch of StartSequence's work outside mu, one per start under way at
	// most, kept for the next ones (a free list, not a sync.Pool, which drops what it holds at
	// every collection and, under the race detector, at random).
	startsMu sync.Mutex
	starts   []*startScratch
}

// NewHybrid makes a Hybrid on dev for cfg.Geometry: one arena per group, each group's page a
// multiple of the device granularity that holds whole blocks, under one budget of cfg.Limit (or
// cfg.Ledger's). An unusable geometry is a *GroupError or *ConfigError; a group the pool or the
// ledger refuses (a name taken: ErrExists) is a *GroupOpError.
func NewHybrid(dev vmm.Device, cfg HybridConfig) (*Hybrid, error) {
	if dev == nil {
		return nil, fmt.Errorf("kvcache: hybrid: %w: nil device", ErrInvalidArgument)
	}
	g := cfg.Geometry
	if err := g.Validate(); err != nil {
		return nil, fmt.Errorf("kvcache: hybrid: %w", err)
	}
	if err := checkHost(cfg); err != nil {
		return nil, err
	}
	info := dev.Info()
	limit := cfg.Limit
	if limit == 0 {
		limit = info.TotalMemory
	}
	pool, err := NewShared(dev, SharedConfig{Limit: limit, CompactOnPressure: cfg.CompactOnPressure, Ledger: cfg.Ledger})
	if err != nil {
		return nil, err // "kvcache: shared pool: ..."
	}
	h, err := newHybridOn(pool, g, func(i int, grp LayerGroup, mu *sync.Mutex) (*Manager, error) {
		gc, err := groupConfig(grp, cfg, info.Granularity)
		if err != nil {
			return nil, err
		}
		if gc, err = groupTiers(i, grp, cfg, gc); err != nil {
			return nil, err
		}
		return pool.register(groupName(cfg.Name, i), gc, mu)
	})
	if err != nil {
		return nil, err
	}
	return h.keepScales()
}

// keepScales puts the fp8 groups' scales in device memory (Scales); on an error it closes h.
func (h *Hybrid) keepScales() (*Hybrid, error) {
	t, err := newScaleTable(h.pool.devs, h.geom)
	if err != nil {
		_ = h.pool.Close()
		return nil, err
	}
	h.scales = t
	return h, nil
}

// newHybridOn makes the Hybrid of g over pool, which it then owns (closed on an error):
// register registers group i's manager in pool with mu as its lock.
func newHybridOn(pool *SharedPool, g Geometry, register func(i int, grp LayerGroup, mu *sync.Mutex) (*Manager, error)) (*Hybrid, error) {
	h := &Hybrid{geom: cloneGeometry(g), pool: pool, mu: new(sync.Mutex)}
	for i, grp := range g.Groups {
		m, err := register(i, grp, h.mu)
		if err != nil {
			_ = pool.Close()
			return nil, &GroupOpError{Group: i, Name: grp.Name, Err: err}
		}
		h.mu.Lock()
		m.holdFor = hybridHold
		h.mu.Unlock()
		h.groups = append(h.groups, m)
	}
	h.txs = make([]appendTx, 0, len(h.groups))
	for _, m := range h.groups {
		h.lanes = append(h.lanes, lane{m: m, bt: int64(m.cfg.BlockTokens), bounded: m.bounded(), state: m.cfg.StateBytes > 0})
	}
	h.chainOf = make([]int, len(h.groups))
	for i, gi := range g.Groups {
		h.chainOf[i] = -1
		for j, gj := range g.Groups[:i] {
			if gi.Kind != RecurrentState && gj.Kind != RecurrentState && gj.BlockTokens == gi.BlockTokens {
				h.chainOf[i] = j
				break
			}
		}
	}
	h.marks = make([]markTx, 0, len(h.groups))
	h.resumes = make([]resumeTx, 0, len(h.groups))
	h.swaps = make([]swapTx, 0, len(h.groups))
	h.found = make([]*sequence.Sequence, len(h.groups))
	h.index = newHybridIndex(len(h.groups))
	h.shareFeed()
	return h, nil
}

// checkHost checks HostTokens and HostSequences (a *ConfigError).
func checkHost(cfg HybridConfig) error {
	recurrent := false
	for _, g := range cfg.Geometry.Groups {
		recurrent = recurrent || g.Kind == RecurrentState
	}
	switch {
	case cfg.HostTokens < 0:
		return &ConfigError{Field: "HostTokens", Value: cfg.HostTokens, Reason: "must not be negative"}
	case cfg.HostSequences < 0 || cfg.HostTokens == 0 && cfg.HostSequences != 0:
		return &ConfigError{Field: "HostSequences", Value: cfg.HostSequences, Reason: "must not be negative, and is 0 without HostTokens"}
	case cfg.HostCacheTokens < 0:
		return &ConfigError{Field: "HostCacheTokens", Value: cfg.HostCacheTokens, Reason: "must not be negative"}
	case cfg.TierTimeout < 0:
		return &ConfigError{Field: "TierTimeout", Value: cfg.TierTimeout, Reason: "must not be negative"}
	case cfg.Tiers != nil && cfg.HostCacheTokens == 0:
		return &ConfigError{Field: "Tiers", Reason: "need a host prefix cache (HostCacheTokens), through which blocks move"}
	case recurrent && cfg.HostTokens > 0 && cfg.HostSequences == 0:
		return &ConfigError{Field: "HostSequences", Value: 0, Reason: "must be positive with HostTokens: a recurrent group swaps one state per sequence"}
	}
	return nil
}

// groupName names group i's model in the pool: "name-i", "group-i" without a name.
func groupName(name string, i int) string {
	if name == "" {
		name = "group"
	}
	return fmt.Sprintf("%s-%d", name, i)
}

// cloneGeometry copies g's slices, so that the caller's changes do not reach the Hybrid.
func cloneGeometry(g Geometry) Geometry {
	out := g
	out.Groups = make([]LayerGroup, len(g.Groups))
	for i, grp := range g.Groups {
		grp.Layers = append([]int(nil), grp.Layers...)
		grp.KScales = append([]float32(nil), grp.KScales...)
		grp.VScales = append([]float32(nil), grp.VScales...)
		out.Groups[i] = grp
	}
	return out
}

// groupConfig returns the Config of group g's arena: its layers' K/V (or state) layout, its
// window or chunk, and a page of whole granules holding a power of two of whole blocks, about
// one granule per layer (the blocks padded to fit exactly: at most one granule a page wasted).
func groupConfig(g LayerGroup, hc HybridConfig, gran uint64) (Config, error) {
	c := Config{
		Layers: len(g.Layers), KVHeads: g.KVHeads, HeadDim: g.KHeadDim, ElemSize: g.DType.Size(), BlockTokens: g.BlockTokens,
		KOnly: g.VHeadDim == 0, Capacity: hc.Capacity, PrefixCacheBytes: hc.PrefixCacheBytes,
		WaitForWrites: hc.WaitForWrites, Strict: hc.Strict, NoBackground: hc.NoBackground,
		ReservePages: hc.ReservePages, HighWatermark: hc.HighWatermark, KeyScheme: hc.KeyScheme,
	}
	if g.VHeadDim != 0 && g.VHeadDim != g.KHeadDim {
		c.VHeadDim = g.VHeadDim
	}
	switch g.Kind {
	case SlidingWindow:
		c.Window, c.Sinks = g.Window, g.Sinks
	case ChunkedAttention:
		c.Chunk = g.Window
	case RecurrentState:
		c = Config{Layers: len(g.Layers), StateBytes: g.StateBytes, CheckpointTokens: g.Checkpoints, Capacity: hc.Capacity, PrefixCacheBytes: hc.PrefixCacheBytes,
			WaitForWrites: hc.WaitForWrites, Strict: hc.Strict, NoBackground: hc.NoBackground,
			ReservePages: hc.ReservePages, HighWatermark: hc.HighWatermark, KeyScheme: hc.KeyScheme}
	}
	if hc.HostTokens > 0 {
		c.HostBlocks = hc.HostSequences
		if g.Kind != RecurrentState {
			c.HostBlocks = hc.HostTokens/g.BlockTokens + min(1, hc.HostTokens%g.BlockTokens)
		}
	}
	if hc.HostCacheTokens > 0 && g.Kind != RecurrentState {
		c.HostSwapBlocks = c.HostBlocks // the swaps' blocks stay theirs
		c.HostBlocks += hc.HostCacheTokens/g.BlockTokens + min(1, hc.HostCacheTokens%g.BlockTokens)
		c.HostPrefixCache = true
	}
	return groupPage(c, gran)
}

// groupPage returns c with the page groupConfig chooses for a device of granularity gran (on
// several devices, for each device's share).
func groupPage(c Config, gran uint64) (Config, error) {
	if gran == 0 || gran%16 != 0 {
		return c, &ConfigError{Field: "device granularity", Value: gran, Reason: "must be a positive multiple of 16"}
	}
	stride := c.BlockStride()
	target, ok := checked.Mul(uint64(c.Layers), gran)
	if !ok {
		return c, &ConfigError{Field: "PageSize", Reason: "one granule per layer overflows"}
	}
	// Blocks a page: a power of two (so a granule divides into 16-byte parts), the page about
	// the target, or up to four times it where that wastes less of the last granule on padding.
	n, page := uint64(1), (stride+gran-1)/gran*gran
	for k := uint64(2); k*stride <= 4*target && k <= gran/16; k *= 2 {
		p := (k*stride + gran - 1) / gran * gran
		if k*stride <= target || (p-k*stride)*page < (page-n*stride)*p { // within the target, or less waste
			n, page = k, p
		}
	}
	if page > MaxBlockStride {
		return c, &ConfigError{Field: "PageSize", Value: page, Reason: fmt.Sprintf("%d blocks of %d bytes", n, stride)}
	}
	c.PageSize, c.BlockPadding = page, page/n-stride
	return c, c.Validate()
}

// made reports whether h is a Hybrid made by NewHybrid.
func (h *Hybrid) made() bool { return h != nil && h.pool != nil }

// errHybridNotMade is the cause of every call on a nil or zero Hybrid.
var errHybridNotMade = fmt.Errorf("%w: nil hybrid, or one not made by NewHybrid", ErrInvalidArgument)

// Geometry returns the model's geometry (a copy).
func (h *Hybrid) Geometry() Geometry {
	if !h.made() {
		return Geometry{}
	}
	return cloneGeometry(h.geom)
}

// Groups returns how many layer groups the model has.
func (h *Hybrid) Groups() int {
	if !h.made() {
		return 0
	}
	return len(h.groups)
}

// Group returns group i's manager (nil outside [0, Groups())): read its tables, layout and
// statistics; change sequences through the Hybrid. The manager refuses the calls that change
// sequences (AddSequence, the appends, StartSequence, FreeSequence, Fork, Truncate, MarkWritten,
// SwapOut, SwapIn) with ErrInvalidArgument.
func (h *Hybrid) Group(i int) *Manager {
	if !h.made() || i < 0 || i >= len(h.groups) {
		return nil
	}
	return h.groups[i]
}

// groupErr names the group an error came from. A group out of memory wakes every group's
// reserve: the spare pages a sibling holds (reserve.go) go back once the budget has no room
// for them, which the sibling cannot see while the Hybrid holds its lock.
func (h *Hybrid) groupErr(i int, err error) error {
	if errors.Is(err, ErrOutOfMemory) {
		for _, m := range h.groups {
			m.kick()
		}
	}
	return &GroupOpError{Group: i, Name: h.geom.Groups[i].Name, Err: err}
}

// GroupOpError reports which layer group refused an operation of a Hybrid; it unwraps to the
// group manager's error (a *SequenceError, a *BlocksError, ...).
type GroupOpError struct {
	Group int
	Name  string
	Err   error
}

// Error describes the failure.
func (e *GroupOpError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("kvcache: hybrid: layer group %d (%q): %s", e.Group, e.Name, strings.TrimPrefix(fmt.Sprint(e.Err), "kvcache: "))
}

// Unwrap returns the group's error.
func (e *GroupOpError) Unwrap() error {
	if e == nil {
		return nil
	}
	return e.Err
}

// AddSequence creates an empty sequence in every group.
func (h *Hybrid) AddSequence(seq SeqID) error {
	if !h.made() {
		return &SequenceError{Op: "add", Seq: seq, Err: errHybridNotMade}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, m := range h.groups {
		if err := m.usable("add", seq); err != nil {
			return h.groupErr(i, err)
		}
		if _, ok := m.seqs.Get(seq); ok {
			return h.groupErr(i, &SequenceError{Op: "add", Seq: seq, Err: ErrSequenceExists})
		}
	}
	for i, m := range h.groups {
		if _, err := m.seqs.Add(seq); err != nil {
			for _, done := range h.groups[:i] {
				s, _ := done.seqs.Get(seq)
				done.seqs.Remove(s)
			}
			return h.groupErr(i, &SequenceError{Op: "add", Seq: seq, Err: err})
		}
	}
	h.index.sync(seq, h.groups)
	return nil
}

// AppendTokens adds n tokens to the sequence in every group and appends each attention group's
// slots to dst[i] (a recurrent group's dst[i] is left as it is): dst must have Groups() entries,
// which it returns. All or nothing: on an error (a *GroupOpError naming the group, wrapping what
// that group's AppendTokens would return) every group and dst are as before. The decode step
// takes the lock once and allocates nothing.
func (h *Hybrid) AppendTokens(seq SeqID, n int, dst [][]int64) ([][]int64, error) {
	return h.append(seq, n, nil, dst)
}

// AppendTokenIDs is AppendTokens for tokens whose ids are known (Manager.AppendTokenIDs in every
// group: their blocks become cached as they fill).
func (h *Hybrid) AppendTokenIDs(seq SeqID, ids []TokenID, dst [][]int64) ([][]int64, error) {
	return h.append(seq, len(ids), ids, dst)
}

// append is AppendTokens (ids nil) and AppendTokenIDs.
func (h *Hybrid) append(seq SeqID, n int, ids []TokenID, dst [][]int64) ([][]int64, error) {
	if !h.made() {
		return dst, &SequenceError{Op: "append", Seq: seq, Err: errHybridNotMade}
	}
	if len(dst) != len(h.groups) {
		return dst, &SequenceError{Op: "append", Seq: seq, Err: &CountError{What: "slot lists", N: len(dst), Max: len(h.groups)}}
	}
	h.mu.Lock()
	rec := h.index.get(seq)
	if rec != nil && h.fastStep(rec, n, ids, dst) {
		h.mu.Unlock()
		return dst, nil
	}
	defer h.mu.Unlock()
	return h.appendSlow(rec, seq, n, ids, dst)
}

// appendSlow is append when some group needs block work (or the request is bad): rec is the
// sequence's record, nil when not every group holds it. Each group that fastAppend allows takes
// the step on its fast path; the others prepare, and commit once all have. The lock is held.
func (h *Hybrid) appendSlow(rec *hybridSeq, seq SeqID, n int, ids []TokenID, dst [][]int64) ([][]int64, error) {
	keyed := ids != nil
	txs := h.txs[:len(h.groups)] // each group prepares into its own; made with that capacity
	for i, m := range h.groups {
		s, ok := h.seqIn(rec, i, seq)
		if ok && s.Keyed == keyed && m.fastAppend(s, n) { // this group needs no block work
			m.prepareFast(&txs[i], s, n)
			continue
		}
		var err error
		if !keyed {
			err = m.checkCounts(s, seq, n)
		}
		if err == nil {
			err = m.prepareAppend(&txs[i], s, seq, n)
		}
		if err != nil {
			for j := i - 1; j >= 0; j-- {
				txs[j].abort()
			}
			return dst, h.groupErr(i, err)
		}
	}
	for i := range txs {
		tx, m := &txs[i], h.groups[i] // no copy of the transaction per group
		h.keep(i, dst, tx.commit(h.slotsOf(i, dst)))
		h.found[i] = tx.s
		switch {
		case tx.fast && keyed:
			m.fastIDs(tx.s, ids, h.chain(i, tx.s, h.found))
		case tx.fast:
		case keyed:
			m.afterIDs(tx, ids, h.chain(i, tx.s, h.found))
			m.publish()
		default:
			if !tx.created {
				m.afterCounts(tx.s, n)
			}
			m.publish()
		}
	}
	if rec == nil { // the append may have created the sequence
		h.index.sync(seq, h.groups)
	}
	return dst, nil
}

// chain returns the sequence whose keys group i's sequence s takes (Manager.storeBlocksFrom):
// the same sequence in group chainOf[i], if it is keyed from the same root; else nil. found
// holds each group's sequence, filled up to group i.
func (h *Hybrid) chain(i int, s *sequence.Sequence, found []*sequence.Sequence) *sequence.Sequence {
	j := h.chainOf[i]
	if j < 0 {
		return nil
	}
	if c := found[j]; c.Keyed && c.Root == s.Root {
		return c
	}
	return nil
}

// lane is what the fast path reads of one group: its manager and the parts of its
// configuration that never change, kept side by side for all groups (Hybrid.lanes) so that a
// step reads one short array instead of each manager's configuration.
type lane struct {
	m       *Manager
	bt      int64 // tokens per block
	bounded bool  // a window or chunk group: blocks fall out of its reach (Manager.bounded)
	state   bool  // a recurrent group: its slots mean nothing
}

// fastStep appends n tokens (with ids, unless nil) of the sequence of rec in every group on its
// fast path, when every group allows it (Manager.fastAppend: room in a tail it alone holds,
// the manager open), and appends each attention group's slots to dst[i]; it reports whether it
// did. Nothing changes when it does not. A window or chunk group first drops what falls out of
// its reach (see fastSlots). One pass checks every group, a second appends: a decode step's
// work per group is a few loads and stores (Manager.fastSlots, inlined by hand).
func (h *Hybrid) fastStep(rec *hybridSeq, n int, ids []TokenID, dst [][]int64) bool {
	keyed := ids != nil
	lanes := h.lanes
	seqs := rec.seqs[:len(lanes)]
	dst = dst[:len(lanes)]
	if n <= 0 {
		return false
	}
	drop := false
	for i := range lanes {
		s, m := seqs[i], lanes[i].m
		if n > s.FastRoom || s.Keyed != keyed || m.closed || m.asleep {
			return false
		}
		drop = drop || lanes[i].bounded && s.Tokens >= s.NextDrop
	}
	if drop {
		h.dropOutOfReach(seqs)
	}
	for i := range lanes {
		s, l := seqs[i], &lanes[i]
		s.FastRoom -= n
		slot := int64(s.Tail)*l.bt + int64(s.Tokens) - int64(len(s.Blocks)-1)*l.bt // as fastSlots
		s.Tokens += n
		switch {
		case l.state: // no slots
		case n == 1: // a decode step: no loop
			dst[i] = append(dst[i], slot)
		default:
			for j := range int64(n) {
				dst[i] = append(dst[i], slot+j)
			}
		}
	}
	if ids != nil {
		for i := range lanes {
			lanes[i].m.fastIDs(seqs[i], ids, h.chain(i, seqs[i], seqs))
		}
	}
	return true
}

// dropOutOfReach drops, in each window or chunk group, the blocks of its sequence in seqs that
// the next token no longer reads (see Manager.fastSlots).
func (h *Hybrid) dropOutOfReach(seqs []*sequence.Sequence) {
	for i, m := range h.groups {
		if s := seqs[i]; m.reachMoved(s) {
			m.dropOutOfReach(s)
		}
	}
}

// seqIn returns the sequence seq in group i: rec's, when seq has a record (rec), else the
// group's registry's.
func (h *Hybrid) seqIn(rec *hybridSeq, i int, seq SeqID) (*sequence.Sequence, bool) {
	if rec != nil {
		return rec.seqs[i], true
	}
	return h.groups[i].seqs.Get(seq)
}

// slotsOf returns where group i's slots go: dst[i], or scratch for a recurrent group, whose
// slots mean nothing.
func (h *Hybrid) slotsOf(i int, dst [][]int64) []int64 {
	if h.groups[i].cfg.StateBytes > 0 {
		return h.scratch[:0]
	}
	return dst[i]
}

// keep stores group i's slots back into dst (or the scratch).
func (h *Hybrid) keep(i int, dst [][]int64, out []int64) {
	if h.groups[i].cfg.StateBytes > 0 {
		h.scratch = out[:0]
		return
	}
	dst[i] = out
}

// MarkWritten marks the K/V of the sequence's first n tokens written in every group (see
// Manager.MarkWritten), and says that a recurrent group's state is the state after n tokens:
// at a multiple of its Checkpoints it makes a checkpoint (see Hybrid). Each group checks and
// prepares first (a checkpoint's copy), then all mark; a failure leaves every group as it was.
func (h *Hybrid) MarkWritten(seq SeqID, n int) error {
	if !h.made() {
		return &SequenceError{Op: "mark written", Seq: seq, Err: errHybridNotMade}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, m := range h.groups {
		if _, err := m.checkMark(seq, n); err != nil {
			return h.groupErr(i, err)
		}
	}
	h.marks = h.marks[:0]
	for i, m := range h.groups {
		s, _ := m.seqs.Get(seq)
		tx, err := m.prepareMark(s, n)
		if err != nil {
			for j := len(h.marks) - 1; j >= 0; j-- {
				h.marks[j].abort()
			}
			return h.groupErr(i, err)
		}
		h.marks = append(h.marks, tx)
	}
	for _, tx := range h.marks {
		tx.commit()
	}
	return nil
}

// StartSequence creates the sequence in every group for a prompt and returns the tokens found
// cached: the longest prefix every group serves, in whole blocks of each (see Hybrid). The
// runtime computes the rest and appends it with AppendTokenIDs. The prompt's keys are computed
// once for each block size (Prompt.Keys, when given, for the first attention group's), and
// each group looks up only the blocks it needs: a window the blocks its next token reads, a
// recurrent group its latest checkpoint. A recurrent group that cannot take or copy the
// resumed state fails the start (a *GroupOpError wrapping a *BlocksError, ErrOutOfMemory or the
// driver's error), and every group is as it was.
func (h *Hybrid) StartSequence(seq SeqID, p Prompt) (int, error) {
	if !h.made() {
		return 0, &SequenceError{Op: "start", Seq: seq, Err: errHybridNotMade}
	}
	if len(p.Tokens) > MaxSequenceTokens {
		return 0, &SequenceError{Op: "start", Seq: seq, Err: &CountError{What: "prompt tokens", N: len(p.Tokens), Max: MaxSequenceTokens}}
	}
	keyBT := h.keyBlockTokens()
	if keyBT > 0 && len(p.Keys) > len(p.Tokens)/keyBT {
		return 0, &SequenceError{Op: "start", Seq: seq, Err: &CountError{What: "keys", N: len(p.Keys), Max: len(p.Tokens) / keyBT}}
	}
	// Outside the lock: hashing. One root and one key chain for each block size.
	sc := h.startScratch()
	defer h.putScratch(sc)
	roots, keys := sc.chains(h, p)
	if err := h.fetchTiers(seq, p, keys); err != nil { // outside the lock: the tiers' I/O
		return 0, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	defer h.forgetKeys() // the scratch goes back to the pool
	for i, m := range h.groups {
		if err := m.checkStart(seq); err != nil {
			return 0, h.groupErr(i, err)
		}
	}
	if len(h.finders) < len(h.groups) {
		h.finders = make([]hitFinder, len(h.groups))
	}
	for i, m := range h.groups {
		h.finders[i].reset(m, keys[i])
	}
	hit := h.agree(maxPromptBlocks(len(p.Tokens), 1))
	hit = h.hostHits(keys, maxPromptBlocks(len(p.Tokens), 1), hit)
	h.resumes = h.resumes[:0]
	for i, m := range h.groups { // the part that can fail: a recurrent group's resumed state
		tx, err := m.prepareResume(seq, &h.finders[i], hit/m.keyTokens())
		if err != nil {
			for j := len(h.resumes) - 1; j >= 0; j-- {
				h.resumes[j].abort()
			}
			h.abortFetches()
			return 0, h.groupErr(i, err)
		}
		h.resumes = append(h.resumes, tx)
	}
	for i, m := range h.groups {
		if _, err := m.startFound(seq, p, roots[i], &h.finders[i], hit/m.keyTokens(), h.resumes[i]); err != nil {
			for _, tx := range h.resumes[i+1:] {
				tx.abort()
			}
			for _, done := range h.groups[:i] {
				s, _ := done.seqs.Get(seq)
				done.free(s)
			}
			h.abortFetches()
			return 0, h.groupErr(i, err)
		}
	}
	h.commitFetches(p, roots, keys, hit)
	h.index.sync(seq, h.groups)
	return hit, nil
}

// startScratch is what a start computes outside the lock: each group's root and key chain, the
// chains' storage and the keyer that hashes them. Starts take one from the Hybrid's free list and
// put it back, so that a start allocates nothing once warm.
type startScratch struct {
	keyer *prefix.Keyer
	roots []prefix.Key
	keys  [][]prefix.Key // each group's chain: in bufs, in the Prompt's Keys, or nil
	bufs  [][]prefix.Key
}

// chains fills sc's roots and key chains for prompt p, one chain for each block size (a
// recurrent group without checkpoints has none), and returns them: what a start and an admission
// look up. It hashes, so it runs outside the lock.
func (sc *startScratch) chains(h *Hybrid, p Prompt) (roots []prefix.Key, keys [][]prefix.Key) {
	keyBT := h.keyBlockTokens()
	roots, keys = sc.roots, sc.keys
	for i, m := range h.groups {
		bt := m.keyTokens()
		j := 0
		for j < i && h.groups[j].keyTokens() != bt {
			j++
		}
		if j < i {
			roots[i] = roots[j]
		} else {
			roots[i] = sc.keyer.Root(p.Namespace, bt)
		}
		keys[i] = nil
		if m.cfg.StateBytes > 0 && m.cfg.CheckpointTokens == 0 {
			continue
		}
		for j := range i {
			if h.groups[j].keyTokens() == bt && keys[j] != nil {
				keys[i] = keys[j]
			}
		}
		if keys[i] == nil {
			keys[i] = promptKeys(sc.keyer, p, roots[i], bt, keyBT, sc.bufs[i][:0])
			sc.bufs[i] = keys[i][:0]
		}
	}
	return roots, keys
}

// startScratch returns a start's scratch from the free list, or a new one.
func (h *Hybrid) startScratch() *startScratch {
	h.startsMu.Lock()
	defer h.startsMu.Unlock()
	if n := len(h.starts); n > 0 {
		sc := h.starts[n-1]
		h.starts = h.starts[:n-1]
		return sc
	}
	n := len(h.groups)
	return &startScratch{keyer: prefix.NewKeyer(h.groups[0].cfg.KeyScheme), roots: make([]prefix.Key, n),
		keys: make([][]prefix.Key, n), bufs: make([][]prefix.Key, n)}
}

// putScratch keeps sc for the next start.
func (h *Hybrid) putScratch(sc *startScratch) {
	h.startsMu.Lock()
	h.starts = append(h.starts, sc)
	h.startsMu.Unlock()
}

// forgetKeys drops the finders' references to a start's key chains (the scratch's, which the
// pool hands to the next start, and the caller's Prompt.Keys). The lock is held.
func (h *Hybrid) forgetKeys() {
	for i := range h.finders {
		h.finders[i].keys = nil
	}
}

// keyBlockTokens is the block size Prompt.Keys are taken to be for: the first attention group's.
func (h *Hybrid) keyBlockTokens() int {
	for _, g := range h.geom.Groups {
		if g.Kind != RecurrentState {
			return g.BlockTokens
		}
	}
	return 0
}

// promptKeys returns the keys of p's whole blocks of bt tokens (root: the namespace's), at most
// all but the last token's: p.Keys where they are for this block size, hashed beyond them.
// The chain goes into buf (grown where short), unless p.Keys hold it whole: then it is p.Keys,
// which nothing writes.
func promptKeys(keyer *prefix.Keyer, p Prompt, root prefix.Key, bt, keyBT int, buf []prefix.Key) []prefix.Key {
	n := maxPromptBlocks(len(p.Tokens), bt)
	if bt == keyBT && len(p.Keys) >= n {
		return p.Keys[:n:n]
	}
	out := buf[:0]
	if bt == keyBT {
		out = append(out, p.Keys[:min(len(p.Keys), n)]...)
	}
	parent := root
	if len(out) > 0 {
		parent = out[len(out)-1]
	}
	for i := len(out); i < n; i++ {
		parent = keyer.Next(p.Namespace, i, parent, p.Tokens[i*bt:(i+1)*bt])
		out = append(out, parent)
	}
	return out
}

// agree returns the longest hit, at most limit tokens, that every group serves in whole blocks
// of its own (a recurrent group's checkpoint intervals): each group in turn shortens it until
// none does (vLLM's coordinator rule). The lock is held and h.finders are reset for the prompt.
func (h *Hybrid) agree(limit int) int {
	hit := limit
	for changed := true; changed && hit > 0; {
		changed = false
		for i, m := range h.groups {
			bt := m.keyTokens()
			if got := h.finders[i].serves(hit/bt) * bt; got < hit {
				hit, changed = got, true
			}
		}
	}
	return hit
}

// FreeSequence drops the sequence from every group.
func (h *Hybrid) FreeSequence(seq SeqID) error {
	if !h.made() {
		return &SequenceError{Op: "free", Seq: seq, Err: errHybridNotMade}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, m := range h.groups {
		if err := m.usable("free", seq); err != nil {
			return h.groupErr(i, err)
		}
		if _, err := m.lookup("free", seq); err != nil {
			return h.groupErr(i, err)
		}
	}
	h.index.remove(h.index.get(seq))
	for _, m := range h.groups {
		s, _ := m.seqs.Get(seq)
		m.free(s)
	}
	return nil
}

// Fork creates dst as a copy of src in every group (sharing blocks; a recurrent state is copied
// by the first append to either). Write a sequence's recurrent state only after an append of
// that sequence: until then a forked state is both sequences'.
func (h *Hybrid) Fork(src, dst SeqID) error {
	if !h.made() {
		return &SequenceError{Op: "fork", Seq: src, Err: errHybridNotMade}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, m := range h.groups {
		if _, err := m.checkFork(src, dst); err != nil {
			return h.groupErr(i, err)
		}
	}
	for i, m := range h.groups {
		s, _ := m.seqs.Get(src)
		if err := m.fork(s, dst); err != nil {
			for _, done := range h.groups[:i] {
				d, _ := done.seqs.Get(dst)
				done.free(d)
			}
			return h.groupErr(i, err)
		}
	}
	h.index.sync(dst, h.groups)
	return nil
}

// Truncate drops the last n tokens of the sequence in every group. A truncation back into
// what a window or chunk group dropped is refused (a *GroupOpError wrapping a *CountError whose
// Max is the most that may go in every group, naming the group that lets the fewest go). A
// recurrent group's state stays as it is, the state after the longer sequence: a state cannot be
// rolled back, so the runtime recomputes it (from a checkpoint, or from the start) before the
// next append.
func (h *Hybrid) Truncate(seq SeqID, n int) error {
	if !h.made() {
		return &SequenceError{Op: "truncate", Seq: seq, Err: errHybridNotMade}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	// The tightest group answers first: another group's refusal would name a Max that the
	// tightest refuses too.
	first := h.tightestTruncate(seq)
	if _, err := h.groups[first].checkTruncate(seq, n); err != nil {
		return h.groupErr(first, err)
	}
	for i, m := range h.groups {
		if _, err := m.checkTruncate(seq, n); err != nil {
			return h.groupErr(i, err)
		}
	}
	for _, m := range h.groups {
		s, _ := m.seqs.Get(seq)
		m.truncate(s, n)
	}
	return nil
}

// tightestTruncate returns the group that lets the fewest of seq's tokens be truncated (its
// window or chunk dropped the most); 0 when none bounds it. The lock is held.
func (h *Hybrid) tightestTruncate(seq SeqID) int {
	best, room := 0, -1
	for i, m := range h.groups {
		s, ok := m.seqs.Get(seq)
		if !ok || s.Swapped {
			return 0
		}
		if r := s.Tokens - m.minLength(s); room < 0 || r < room {
			best, room = i, r
		}
	}
	return best
}

// Len returns the sequence's token count.
func (h *Hybrid) Len(seq SeqID) (int, error) {
	if !h.made() {
		return 0, &SequenceError{Op: "len", Seq: seq, Err: errHybridNotMade}
	}
	return h.groups[0].Len(seq)
}

// Compact compacts every group (see Manager.Compact), with opts for each.
func (h *Hybrid) Compact(opts CompactOptions) (CompactResult, error) {
	if !h.made() {
		return CompactResult{}, fmt.Errorf("kvcache: compact: %w", errHybridNotMade)
	}
	var sum CompactResult
	for i, m := range h.groups {
		r, err := m.Compact(opts)
		if err != nil {
			return sum, h.groupErr(i, err)
		}
		sum.BlocksMoved += r.BlocksMoved
		sum.BytesMoved += r.BytesMoved
		sum.PagesReleased += r.PagesReleased
	}
	return sum, nil
}

// HybridStats is a snapshot of every group, and what they map together.
type HybridStats struct {
	Groups      []Stats
	MappedBytes uint64
}

// Stats returns each group's Stats and their mapped bytes together (the zero HybridStats for a
// nil Hybrid). It allocates the Groups slice.
func (h *Hybrid) Stats() HybridStats {
	if !h.made() {
		return HybridStats{}
	}
	var st HybridStats
	for _, m := range h.groups {
		s := m.Stats()
		st.Groups = append(st.Groups, s)
		st.MappedBytes += s.MappedBytes
	}
	return st
}

// Settle applies every group's watermarks now (Manager.Settle).
func (h *Hybrid) Settle() error {
	if !h.made() {
		return fmt.Errorf("kvcache: settle: %w", errHybridNotMade)
	}
	for i, m := range h.groups {
		if err := m.Settle(); err != nil {
			return h.groupErr(i, err)
		}
	}
	return nil
}

// Verify checks every group's invariants, and that the groups hold the same sequences with the
// same lengths.
func (h *Hybrid) Verify() error {
	if !h.made() {
		return fmt.Errorf("kvcache: verify: %w", errHybridNotMade)
	}
	if h.groups[0].closedNow() {
		return fmt.Errorf("kvcache: verify: %w", ErrClosed)
	}
	var errs []error
	for i, m := range h.groups {
		if err := m.Verify(); err != nil {
			errs = append(errs, h.groupErr(i, err))
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	first := h.groups[0]
	for i, m := range h.groups[1:] {
		if m.seqs.Len() != first.seqs.Len() {
			errs = append(errs, fmt.Errorf("kvcache: verify: group %d holds %d sequences, group 0 %d", i+1, m.seqs.Len(), first.seqs.Len()))
		}
	}
	first.seqs.All(func(s *sequence.Sequence) bool {
		for i, m := range h.groups[1:] {
			if o, ok := m.seqs.Get(s.ID); !ok || o.Tokens != s.Tokens {
				errs = append(errs, fmt.Errorf("kvcache: verify: sequence %d: group %d disagrees with group 0 (%d tokens)", s.ID, i+1, s.Tokens))
			}
		}
		return true
	})
	errs = append(errs, h.index.verify(h.groups)...)
	return errors.Join(errs...)
}

// Close releases every group's memory and the fp8 scales, also when a group reports an error
// (a driver failure, a swap never closed). When a device did not take memory back (the error
// says which), a later Close tries again; a Close after one that returned everything returns
// ErrClosed.
func (h *Hybrid) Close() error {
	if !h.made() {
		return fmt.Errorf("kvcache: close: %w", errHybridNotMade)
	}
	err := h.pool.Close()
	if errors.Is(err, ErrClosed) {
		return h.closeAgain()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return errors.Join(err, h.scales.close())
}

// closeAgain is a later Close: it tries again what an earlier one could not return, the
// groups' memory and the scales, or returns ErrClosed when nothing is left.
func (h *Hybrid) closeAgain() error {
	if !h.leftOpen() {
		return fmt.Errorf("kvcache: close: %w", ErrClosed)
	}
	var errs []error
	for _, m := range h.groups { // each takes h.mu, its lock
		errs = append(errs, closeModel(m))
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return errors.Join(append(errs, h.scales.close())...)
}

// leftOpen reports whether a Close left memory on a device: a group's or the scales'.
func (h *Hybrid) leftOpen() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	open := h.scales.open()
	for _, m := range h.groups {
		open = open || m.backOpen
	}
	return open
}

package kvcache_test

import (
	"encoding/binary"
	"fmt"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/devtest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// tpGeometry has a group of each kind tensor parallelism divides differently: full attention
// of 4 KV heads, a 32-token window of 2, an MLA latent (1 "head", copied on every rank) in
// 32-token blocks, and a recurrent state of 4 KiB a layer with a checkpoint every 32 tokens.
func tpGeometry() kvcache.Geometry {
	return kvcache.Geometry{Model: "tp", Layers: 6, Groups: []kvcache.LayerGroup{
		{Name: "full", Layers: []int{0, 3}, KVHeads: 4, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "window", Layers: []int{1, 4}, Kind: kvcache.SlidingWindow, Window: 32, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "mla", Layers: []int{2}, KVHeads: 1, KHeadDim: 96, RopeDim: 16, DType: kvcache.BF16, BlockTokens: 32},
		{Name: "state", Layers: []int{5}, Kind: kvcache.RecurrentState, StateBytes: 4096, Checkpoints: 32},
	}}
}

// altGeometry is gpt-oss's pattern on 8 layers: a 32-token window on the even layers, full
// attention on the odd ones, 2 KV heads of 32 each in 8-token blocks (small, so that a page holds
// several and compaction has blocks to move).
func altGeometry() kvcache.Geometry {
	var even, odd []int
	for l := range 8 {
		if l%2 == 0 {
			even = append(even, l)
		} else {
			odd = append(odd, l)
		}
	}
	return kvcache.Geometry{Model: "alt", Layers: 8, Groups: []kvcache.LayerGroup{
		{Name: "sliding", Layers: even, Kind: kvcache.SlidingWindow, Window: 32, KVHeads: 2, KHeadDim: 32, VHeadDim: 32, DType: kvcache.BF16, BlockTokens: 8},
		{Name: "full", Layers: odd, KVHeads: 2, KHeadDim: 32, VHeadDim: 32, DType: kvcache.BF16, BlockTokens: 8},
	}}
}

func hybridMultiConfig(g kvcache.Geometry) kvcache.HybridConfig {
	return kvcache.HybridConfig{Geometry: g, Limit: 64 << 20, Capacity: 16 << 20, PrefixCacheBytes: 4 << 20, NoBackground: true}
}

func newHybridMulti(t *testing.T, devs []vmm.Device, g kvcache.Geometry, split kvcache.Split) *kvcache.Hybrid {
	t.Helper()
	h, err := kvcache.NewHybridMulti(devs, hybridMultiConfig(g), split)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, h.Close()) })
	return h
}

// multiData keeps a value per token (and a tag per recurrent state) in every group, written
// into each device's share as the runtime's kernels would, and reads them back through each
// group's table.
type multiData struct {
	t     *testing.T
	h     *kvcache.Hybrid
	val   map[kvcache.SeqID][]uint64
	state map[kvcache.SeqID]uint64
}

func newMultiData(t *testing.T, h *kvcache.Hybrid) *multiData {
	return &multiData{t: t, h: h, val: map[kvcache.SeqID][]uint64{}, state: map[kvcache.SeqID]uint64{}}
}

// places calls fn for every place where group g keeps the value of the token at offset off of
// block b (a state's at offset 0): the first and last word of its K and V rows in every layer
// of every device's share, each with a word of its own (the device, layer and K|V mixed in), so
// that shares that overlapped would be found out.
func (d *multiData) places(g int, b int32, off int, val uint64, fn func(dev vmm.Device, a vmm.Addr, word uint64)) {
	for i, s := range d.h.Group(g).Shards() {
		for l := s.Layers[0]; l < s.Layers[1]; l++ {
			for kv, row := range []uint64{s.Config.TokenBytes(), s.Config.VTokenBytes()} {
				if s.Config.StateBytes > 0 && kv == 0 {
					row = s.Config.StateBytes
				}
				if row == 0 {
					continue // K only, or a state's V
				}
				a := s.BlockAddr(l, kv, b) + vmm.Addr(uint64(off)*row)
				w := val ^ uint64(i)<<40 ^ uint64(l)<<48 ^ uint64(kv)<<56
				fn(s.Device, a, w)
				fn(s.Device, a+vmm.Addr(row-8), w)
			}
		}
	}
}

func (d *multiData) put(dev vmm.Device, a vmm.Addr, w uint64) {
	require.NoError(d.t, dev.CopyIn(a, binary.LittleEndian.AppendUint64(nil, w)))
}

// write stores the values of the tokens [from, from+n) of seq at the slots dst holds for them.
func (d *multiData) write(seq kvcache.SeqID, from int, dst [][]int64) {
	for g := range d.h.Groups() {
		c := d.h.Group(g).Config()
		if c.StateBytes > 0 {
			continue
		}
		for len(d.val[seq]) < from+len(dst[g]) {
			d.val[seq] = append(d.val[seq], uint64(seq)<<32|uint64(len(d.val[seq]))|1<<63)
		}
		for i, slot := range dst[g] {
			bt := int64(c.BlockTokens)
			d.places(g, int32(slot/bt), int(slot%bt), d.val[seq][from+i], d.put)
		}
	}
}

// writeState writes tag into seq's state in every recurrent group, on every device.
func (d *multiData) writeState(seq kvcache.SeqID, tag uint64) {
	for g := range d.h.Groups() {
		if d.h.Group(g).Config().StateBytes == 0 {
			continue
		}
		b, err := d.h.Group(g).Blocks(seq, nil)
		require.NoError(d.t, err)
		d.places(g, b[0], 0, tag, d.put)
	}
	d.state[seq] = tag
}

// verify checks the Hybrid's invariants and reads every value the live sequences hold back
// through each group's table, on every device.
func (d *multiData) verify(step string) {
	t := d.t
	require.NoError(t, d.h.Verify(), step)
	var seqs []kvcache.SeqID
	for s := range d.val {
		seqs = append(seqs, s)
	}
	slices.Sort(seqs)
	read := func(what string) func(dev vmm.Device, a vmm.Addr, w uint64) {
		return func(dev vmm.Device, a vmm.Addr, w uint64) {
			var buf [8]byte
			require.NoError(t, dev.CopyOut(buf[:], a))
			require.Equal(t, w, binary.LittleEndian.Uint64(buf[:]), "%s: %s on %s", step, what, dev.Info().Name)
		}
	}
	for g := range d.h.Groups() {
		m := d.h.Group(g)
		c := m.Config()
		if c.StateBytes > 0 {
			for _, seq := range seqs {
				if tag, ok := d.state[seq]; ok {
					b, err := m.Blocks(seq, nil)
					require.NoError(t, err)
					d.places(g, b[0], 0, tag, read(fmt.Sprintf("group %d sequence %d state", g, seq)))
				}
			}
			continue
		}
		vt := devtest.VLLM(t, len(seqs), 64, -1)
		require.NoError(t, m.ExportVLLM(seqs, vt))
		for row, seq := range seqs {
			line := vt.Table()[row*vt.MaxBlocks : (row+1)*vt.MaxBlocks]
			require.Len(t, d.val[seq], int(vt.Lens()[row]), "%s: sequence %d", step, seq)
			for pos, v := range d.val[seq] {
				if b := line[pos/c.BlockTokens]; b != kvcache.NullBlock {
					d.places(g, b, pos%c.BlockTokens, v, read(fmt.Sprintf("group %d sequence %d token %d", g, seq, pos)))
				}
			}
		}
	}
}

// free drops seq from the Hybrid and the model.
func (d *multiData) free(seq kvcache.SeqID) {
	require.NoError(d.t, d.h.FreeSequence(seq))
	delete(d.val, seq)
	delete(d.state, seq)
}

// multiScenario appends a keyed prompt (each group publishes its blocks once, whatever its
// devices; marking the state checkpoints it), forks it and appends to the fork (copying the
// state), makes holes and compacts, and starts the prompt again from the cache. Every value
// reads back through every group's table on every device after each step.
func multiScenario(t *testing.T, h *kvcache.Hybrid) {
	d := newMultiData(t, h)
	dst := make([][]int64, h.Groups())
	reset := func() {
		for g := range dst {
			dst[g] = dst[g][:0]
		}
	}
	p := promptOf(100, 7)
	sub, err := h.Subscribe(1 << 12)
	require.NoError(t, err)
	hit, err := h.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Zero(t, hit)
	dst, err = h.AppendTokenIDs(1, p, dst)
	require.NoError(t, err)
	d.write(1, 0, dst)
	stored := map[int]int{}
	for _, ev := range sub.Read(nil) {
		require.True(t, ev.HasGroup)
		if ev.Kind == prefix.BlockStored {
			stored[ev.Group] += len(ev.Keys)
		}
	}
	for g, grp := range h.Geometry().Groups {
		want := 100 / max(grp.BlockTokens, 1) // every whole block, once for all devices
		if grp.Kind == kvcache.RecurrentState {
			want = 0
		}
		assert.Equal(t, want, stored[g], "group %d's events", g)
	}
	d.writeState(1, 0xa1)
	require.NoError(t, h.MarkWritten(1, 96)) // a checkpoint of the state after 96 tokens
	d.verify("prompt")

	require.NoError(t, h.Fork(1, 2))
	d.val[2] = slices.Clone(d.val[1])
	d.state[2] = d.state[1]
	d.verify("fork")
	reset()
	dst, err = h.AppendTokens(2, 20, dst) // copies the shared state, on every device
	require.NoError(t, err)
	d.write(2, 100, dst)
	d.verify("append to the fork")
	d.writeState(2, 0xb2)
	d.verify("the fork's own state")

	for s := kvcache.SeqID(10); s < 16; s++ {
		reset()
		dst, err = h.AppendTokens(s, 40, dst)
		require.NoError(t, err)
		d.write(s, 0, dst)
		d.writeState(s, 0xc0|uint64(s))
	}
	for s := kvcache.SeqID(10); s < 16; s += 2 {
		d.free(s)
	}
	res, err := h.Compact(kvcache.CompactOptions{})
	require.NoError(t, err)
	require.Positive(t, res.BlocksMoved)
	d.verify("compaction")

	prompt1 := slices.Clone(d.val[1][:96])
	d.free(1)
	hit, err = h.StartSequence(3, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 96, hit, "whole blocks of every group, and the state's checkpoint")
	d.val[3] = prompt1
	d.state[3] = 0xa1 // resumed from the checkpoint
	d.verify("prefix hit")
	reset()
	dst, err = h.AppendTokenIDs(3, p[hit:], dst)
	require.NoError(t, err)
	d.write(3, hit, dst)
	d.verify("after the hit")
}

// Tensor parallel over two devices: each device's share of every group is sized for its heads
// (a copy of the MLA latent on each, half of each layer's state), every group's data reads back
// on every device through its table after appends, a fork, a compaction and a prefix hit, and
// each device maps exactly its shares of the pages.
func TestHybridMultiTensorParallel(t *testing.T) {
	devs := hostDevices(t, 2)
	h := newHybridMulti(t, devs, tpGeometry(), kvcache.Split{TensorParallel: 2})
	for g, want := range []struct {
		stride uint64 // a block's bytes on one device, padding aside
		heads  [][2]int
	}{
		{2 * 16 * (2 * 64 * 2 * 2), [][2]int{{0, 2}, {2, 4}}}, // full: 2 layers of 2 heads' K and V
		{2 * 16 * (1 * 64 * 2 * 2), [][2]int{{0, 1}, {1, 2}}}, // window: 1 head each
		{32 * 96 * 2, [][2]int{{0, 1}, {0, 1}}},               // mla: the latent on both
		{4096 / 2, [][2]int{{0, 0}, {0, 0}}},                  // state: half of it each
	} {
		m := h.Group(g)
		sh := m.Shards()
		require.Len(t, sh, 2)
		for d, s := range sh {
			assert.Same(t, devs[d], s.Device)
			assert.Equal(t, want.stride, s.Config.BlockStride()-s.Config.BlockPadding, "group %d device %d", g, d)
			assert.Equal(t, want.heads[d], s.KVHeads, "group %d device %d", g, d)
			assert.Equal(t, [2]int{0, len(tpGeometry().Groups[g].Layers)}, s.Layers, "group %d device %d: every layer", g, d)
			assert.Zero(t, s.Config.PageSize%(4<<10), "group %d: whole granules", g)
			assert.Equal(t, m.Config().BlocksPerPage(), s.Config.BlocksPerPage(), "group %d", g)
		}
		assert.Equal(t, 2*sh[0].Config.BlockStride(), m.Config().BlockStride(), "group %d: a block on both devices", g)
	}
	assert.EqualValues(t, 4096, h.Group(3).Config().StateBytes, "the group's Config is the whole state")

	_, err := h.AppendTokens(1, 100, make([][]int64, h.Groups()))
	require.NoError(t, err)
	for d, dev := range devs { // each device maps its share of every group's pages
		want := uint64(0)
		for g := range h.Groups() {
			want += uint64(h.Group(g).Stats().MappedPages) * h.Group(g).Shards()[d].Config.PageSize
		}
		free, total, err := dev.MemInfo()
		require.NoError(t, err)
		assert.Equal(t, want, total-free, "device %d", d)
	}
	require.NoError(t, h.FreeSequence(1))
	multiScenario(t, h)
}

// Pipeline parallel on a geometry whose groups alternate layers: each stage holds each group's
// half of its layers, which are the model layers of that stage; over two devices, and with
// tensor parallelism too over four.
func TestHybridMultiPipelineParallel(t *testing.T) {
	for _, split := range []kvcache.Split{{PipelineParallel: 2}, {TensorParallel: 2, PipelineParallel: 2}} {
		t.Run(fmt.Sprintf("%dx%d", max(split.TensorParallel, 1), split.PipelineParallel), func(t *testing.T) {
			tp := max(split.TensorParallel, 1)
			devs := hostDevices(t, tp*2)
			geom := altGeometry()
			h := newHybridMulti(t, devs, geom, split)
			for g := range h.Groups() {
				sh := h.Group(g).Shards()
				require.Len(t, sh, len(devs))
				for d, s := range sh {
					stage, rank := d/tp, d%tp
					assert.Equal(t, [2]int{2 * stage, 2*stage + 2}, s.Layers, "group %d device %d: the group's layers of stage %d", g, d, stage)
					for _, l := range geom.Groups[g].Layers[s.Layers[0]:s.Layers[1]] {
						assert.Equal(t, stage, l/4, "group %d device %d: model layer %d", g, d, l)
					}
					assert.Equal(t, [2]int{rank * 2 / tp, (rank + 1) * 2 / tp}, s.KVHeads, "group %d device %d", g, d)
					assert.Equal(t, uint64(2*8*(2/tp)*32*2*2), s.Config.BlockStride()-s.Config.BlockPadding, "group %d device %d", g, d)
				}
			}
			multiScenario(t, h)
		})
	}
}

// A split the geometry cannot take, or devices that do not fit it, is refused with an error
// naming the group and its numbers, and nothing is left on the devices (leakcheck).
func TestHybridMultiRefusals(t *testing.T) {
	devs := hostDevices(t, 4)
	odd := tpGeometry()
	odd.Groups[0].KVHeads = 3
	oddState := tpGeometry()
	oddState.Groups[3].StateBytes = 4096 + 16
	blocked := kvcache.Geometry{Model: "blocked", Layers: 4, Groups: []kvcache.LayerGroup{ // group 0 all in stage 0
		{Name: "front", Layers: []int{0, 1}, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
		{Name: "back", Layers: []int{2, 3}, KVHeads: 2, KHeadDim: 64, VHeadDim: 64, DType: kvcache.BF16, BlockTokens: 16},
	}}
	three := altGeometry()
	three.Layers = 7
	three.Groups[1].Layers = []int{1, 3, 5}
	for _, c := range []struct {
		name  string
		devs  []vmm.Device
		geom  kvcache.Geometry
		split kvcache.Split
		group int // the group named, or -1 for a *ConfigError
		field string
		value any
		cfg   func(c *kvcache.HybridConfig) // NewHybrid's refusals of a host tier, too
	}{
		{"3 KV heads among 2 ranks", devs[:2], odd, kvcache.Split{TensorParallel: 2}, 0, "KVHeads", 3, nil},
		{"a state not divisible by 2x16", devs[:2], oddState, kvcache.Split{TensorParallel: 2}, 3, "StateBytes", uint64(4112), nil},
		{"1 MLA layer over 2 stages", devs[:2], tpGeometry(), kvcache.Split{PipelineParallel: 2}, 2, "Layers", 1, nil},
		{"a group's layers in one stage", devs[:2], blocked, kvcache.Split{PipelineParallel: 2}, 0, "Layers", 1, nil},
		{"7 layers over 2 stages", devs[:2], three, kvcache.Split{PipelineParallel: 2}, -1, "Geometry.Layers", 7, nil},
		{"3 devices for 2 ranks", devs[:3], tpGeometry(), kvcache.Split{TensorParallel: 2}, -1, "devices", 3, nil},
		{"no devices", nil, tpGeometry(), kvcache.Split{TensorParallel: 2}, -1, "devices", 0, nil},
		{"a nil device", []vmm.Device{devs[0], nil}, tpGeometry(), kvcache.Split{TensorParallel: 2}, -1, "devices", 1, nil},
		{"a repeated device", []vmm.Device{devs[0], devs[1], devs[0], devs[2]}, altGeometry(), kvcache.Split{TensorParallel: 2, PipelineParallel: 2}, -1, "devices", 2, nil},
		{"a negative split", devs[:2], tpGeometry(), kvcache.Split{TensorParallel: -2}, -1, "Split", kvcache.Split{TensorParallel: -2}, nil},
		{"a host tier without states", devs[:2], tpGeometry(), kvcache.Split{TensorParallel: 2}, -1, "HostSequences", 0,
			func(c *kvcache.HybridConfig) { c.HostTokens = 512 }},
		{"negative host tokens", devs[:2], tpGeometry(), kvcache.Split{TensorParallel: 2}, -1, "HostTokens", -1,
			func(c *kvcache.HybridConfig) { c.HostTokens = -1 }},
		{"a negative host cache", devs[:2], altGeometry(), kvcache.Split{TensorParallel: 2}, -1, "HostCacheTokens", -64,
			func(c *kvcache.HybridConfig) { c.HostCacheTokens = -64 }},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := hybridMultiConfig(c.geom)
			if c.cfg != nil {
				c.cfg(&cfg)
			}
			h, err := kvcache.NewHybridMulti(c.devs, cfg, c.split)
			require.Nil(t, h)
			require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
			if c.group >= 0 {
				var ge *kvcache.GroupError
				require.ErrorAs(t, err, &ge)
				assert.Equal(t, c.group, ge.Group)
				assert.Equal(t, c.geom.Groups[c.group].Name, ge.Name)
				assert.Equal(t, c.field, ge.Field)
				assert.Equal(t, c.value, ge.Value)
			} else {
				var ce *kvcache.ConfigError
				require.ErrorAs(t, err, &ce)
				assert.Equal(t, c.field, ce.Field)
				assert.Equal(t, c.value, ce.Value)
			}
			t.Log(err)
			for _, dev := range devs {
				free, total, err := dev.MemInfo()
				require.NoError(t, err)
				assert.Equal(t, total, free, "nothing mapped")
			}
		})
	}
}

// One device's growth failing, in any group, leaves every group and every device as it was,
// and a later append succeeds: on two devices (tensor parallel) and four (both).
func TestHybridMultiFaults(t *testing.T) {
	for _, c := range []struct {
		geom  kvcache.Geometry
		split kvcache.Split
	}{{tpGeometry(), kvcache.Split{TensorParallel: 2}}, {altGeometry(), kvcache.Split{TensorParallel: 2, PipelineParallel: 2}}} {
		n := max(c.split.TensorParallel, 1) * max(c.split.PipelineParallel, 1)
		for k := range n {
			t.Run(fmt.Sprintf("%s/%d devices/device %d", c.geom.Model, n, k), func(t *testing.T) {
				devs, faults := faultyHostDevices(t, n)
				h := newHybridMulti(t, devs, c.geom, c.split)
				d := newMultiData(t, h)
				for s := kvcache.SeqID(1); s <= 2; s++ { // two states: the state group's first page full
					dst, err := h.AppendTokens(s, 40, make([][]int64, h.Groups()))
					require.NoError(t, err)
					d.write(s, 0, dst)
					d.writeState(s, 0xa0|uint64(s))
				}
				failedIn := map[int]bool{}
				for _, op := range []vmm.Op{vmm.OpCreate, vmm.OpMap, vmm.OpSetAccess} {
					before, free0 := hybridShape(t, h), freeOf(t, devs)
					for call := 1; ; call++ {
						require.NoError(t, faults[k].FailNth(op, call, nil))
						_, err := h.AppendTokens(3, 300, make([][]int64, h.Groups())) // new pages in every group
						faults[k].Clear()
						if err == nil {
							require.NoError(t, h.FreeSequence(3))
							require.NoError(t, h.Settle())
							break
						}
						require.ErrorIs(t, err, vmm.ErrInjected, "%s call %d", op, call)
						var ge *kvcache.GroupOpError
						require.ErrorAs(t, err, &ge)
						failedIn[ge.Group] = true
						require.Equal(t, before, hybridShape(t, h), "%s call %d failed in group %d", op, call, ge.Group)
						require.Equal(t, free0, freeOf(t, devs), "%s call %d: every device as before", op, call)
						d.verify(fmt.Sprintf("%s call %d", op, call))
					}
				}
				require.Len(t, failedIn, h.Groups(), "a failure in every group: %v", failedIn)
				dst, err := h.AppendTokens(1, 100, make([][]int64, h.Groups()))
				require.NoError(t, err, "and it works afterwards")
				d.write(1, 40, dst)
				d.verify("after the faults")
			})
		}
	}
}

// fp8Geometry is tpGeometry with its full-attention group in fp8: its scales live on every
// device.
func fp8Geometry() kvcache.Geometry {
	g := tpGeometry()
	g.Groups[0].DType = kvcache.FP8E4M3
	g.Groups[0].KScales = []float32{0.5, 0.5}
	g.Groups[0].VScales = []float32{0.25, 0.25}
	return g
}

// A Close failing on device k (an unmap, a release, a reservation's free, in a group or in the
// fp8 scales) names the device, and a second Close returns everything on every device; only
// then is Close ErrClosed.
func TestHybridMultiCloseFails(t *testing.T) {
	for k := range 2 {
		for _, op := range []vmm.Op{vmm.OpUnmap, vmm.OpRelease, vmm.OpFreeReservation} {
			for call := 1; ; call++ {
				devs, faults := faultyHostDevices(t, 2)
				free0 := freeOf(t, devs)
				h, err := kvcache.NewHybridMulti(devs, hybridMultiConfig(fp8Geometry()), kvcache.Split{TensorParallel: 2})
				require.NoError(t, err)
				_, err = h.AppendTokens(1, 100, make([][]int64, h.Groups()))
				require.NoError(t, err)
				require.NoError(t, faults[k].FailNth(op, call, nil))
				base := faults[k].Calls(op)
				err = h.Close()
				hit := faults[k].Calls(op)-base >= call
				faults[k].Clear()
				if err != nil {
					require.ErrorIs(t, err, vmm.ErrInjected)
					require.Contains(t, err.Error(), fmt.Sprintf("device %d", k))
					require.NoError(t, h.Close(), "device %d %s call %d: a second Close returns the rest", k, op, call)
				}
				require.ErrorIs(t, h.Close(), kvcache.ErrClosed)
				_, err = h.Scales(0, 0)
				require.ErrorIs(t, err, kvcache.ErrClosed)
				require.Equal(t, free0, freeOf(t, devs), "device %d %s call %d: every device's memory back", k, op, call)
				if !hit {
					break
				}
			}
		}
	}
}

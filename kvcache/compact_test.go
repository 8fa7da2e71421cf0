package kvcache_test

import (
	"crypto/sha256"
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/internal/testutil/devtest"
	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// kvData is what the test writes: a random fp16 row per (sequence, token, layer, K|V).
type kvData struct {
	cfg  kvcache.Config
	rows map[kvcache.SeqID][][][]byte // [token][layer*2+kv] -> row of TokenBytes
}

func (d *kvData) row(s kvcache.SeqID, t, layer, kv int) []byte { return d.rows[s][t][2*layer+kv] }

func randomHalfs(r *rand.Rand, n int) []byte {
	b := make([]byte, 2*n)
	for i := range n {
		binary.LittleEndian.PutUint16(b[2*i:], kernels.HalfFromFloat32(float32(2*r.Float64()-1)))
	}
	return b
}

// writeAll writes every token's K and V of every layer with the write_kv kernel, staged through
// device memory as a runtime would.
func writeAll(t *testing.T, dev vmm.Device, k *kernels.Kernels, m *kvcache.Manager, d *kvData, ids []kvcache.SeqID) {
	c := m.Config()
	tb := c.TokenBytes()
	var slots []int64
	var order [][2]int // (seq index, token)
	for i, id := range ids {
		n, err := m.Len(id)
		require.NoError(t, err)
		slots, err = m.Slots(id, 0, n, slots)
		require.NoError(t, err)
		for tok := range n {
			order = append(order, [2]int{i, tok})
		}
	}
	n := len(order)
	stage := devtest.Mapped(t, dev, 2*uint64(n)*tb+8*uint64(n))
	key, value, slotAddr := stage, stage+vmm.Addr(uint64(n)*tb), stage+vmm.Addr(2*uint64(n)*tb)
	sb := make([]byte, 8*n)
	for i, s := range slots {
		binary.LittleEndian.PutUint64(sb[8*i:], uint64(s))
	}
	require.NoError(t, dev.CopyIn(slotAddr, sb))
	kb, vb := make([]byte, uint64(n)*tb), make([]byte, uint64(n)*tb)
	for layer := range c.Layers {
		for i, o := range order {
			copy(kb[uint64(i)*tb:], d.row(ids[o[0]], o[1], layer, 0))
			copy(vb[uint64(i)*tb:], d.row(ids[o[0]], o[1], layer, 1))
		}
		require.NoError(t, dev.CopyIn(key, kb))
		require.NoError(t, dev.CopyIn(value, vb))
		require.NoError(t, k.WriteKV(0, m.LayerBase(layer, 0), m.LayerBase(layer, 1), key, value, slotAddr, n, tb, c.BlockTokens, c.BlockStride()))
	}
	require.NoError(t, k.Synchronize(0))
}

// checkAll reads every token of every layer back through the sequence's block table and
// compares a checksum per (sequence, layer, K|V) with what was written.
func checkAll(t *testing.T, dev vmm.Device, m *kvcache.Manager, d *kvData, ids []kvcache.SeqID, stage string) {
	c := m.Config()
	row := make([]byte, c.TokenBytes())
	for _, id := range ids {
		blocks, err := m.Blocks(id, nil)
		require.NoError(t, err)
		n, _ := m.Len(id)
		for layer := range c.Layers {
			for kv := range 2 {
				got, want := sha256.New(), sha256.New()
				for tok := range n {
					a := m.BlockAddr(layer, kv, blocks[tok/c.BlockTokens]) + vmm.Addr(uint64(tok%c.BlockTokens)*c.TokenBytes())
					require.NoError(t, dev.CopyOut(row, a))
					got.Write(row)
					want.Write(d.row(id, tok, layer, kv))
				}
				require.Equal(t, want.Sum(nil), got.Sum(nil), "%s: sequence %d layer %d kv %d", stage, id, layer, kv)
			}
		}
	}
}

// checkAttention runs the paged attention kernel over layer `layer` through exported vLLM
// tables and compares it with attention over the same K/V laid out contiguously, computed here.
func checkAttention(t *testing.T, dev vmm.Device, k *kernels.Kernels, m *kvcache.Manager, d *kvData, ids []kvcache.SeqID, layer, numHeads int, stage string) {
	c := m.Config()
	maxBlocks := 0
	for _, id := range ids {
		b, _ := m.Blocks(id, nil)
		maxBlocks = max(maxBlocks, len(b))
	}
	vt := devtest.VLLM(t, len(ids), maxBlocks, -1)
	require.NoError(t, m.ExportVLLM(ids, vt))
	tables, err := blocktable.NewDeviceTables(dev, len(ids), maxBlocks, 1)
	require.NoError(t, err)
	defer func() { require.NoError(t, tables.Close()) }()
	require.NoError(t, tables.UploadVLLM(vt, nil))

	r := rand.New(rand.NewPCG(7, 7))
	qElems := len(ids) * numHeads * c.HeadDim
	q := randomHalfs(r, qElems)
	buf := devtest.Mapped(t, dev, uint64(2*qElems+4*qElems))
	qAddr, outAddr := buf, buf+vmm.Addr(2*qElems)
	require.NoError(t, dev.CopyIn(qAddr, q))
	scale := float32(1 / math.Sqrt(float64(c.HeadDim)))
	require.NoError(t, k.PagedAttention(0, kernels.Attention{
		Out: outAddr, Q: qAddr, KBase: m.LayerBase(layer, 0), VBase: m.LayerBase(layer, 1),
		BlockTables: tables.BlockTables, SeqLens: tables.SeqLens, NumSeqs: len(ids), MaxBlocks: maxBlocks,
		NumHeads: numHeads, KVHeads: c.KVHeads, HeadDim: c.HeadDim, BlockTokens: c.BlockTokens,
		BlockStride: c.BlockStride(), Scale: scale, Blocks: m.Layout().Blocks,
	}))
	require.NoError(t, k.Synchronize(0))
	out := make([]byte, 4*qElems)
	require.NoError(t, dev.CopyOut(out, outAddr))

	h := func(b []byte, i int) float64 {
		return float64(kernels.HalfToFloat32(binary.LittleEndian.Uint16(b[2*i:])))
	}
	worst := 0.0
	for si, id := range ids {
		n, _ := m.Len(id)
		for head := range numHeads {
			kvh := head / (numHeads / c.KVHeads)
			qo := (si*numHeads + head) * c.HeadDim
			scores := make([]float64, n)
			mx := math.Inf(-1)
			for tok := range n {
				kr := d.row(id, tok, layer, 0)
				dot := 0.0
				for x := range c.HeadDim {
					dot += h(q, qo+x) * h(kr, kvh*c.HeadDim+x)
				}
				scores[tok] = dot * float64(scale)
				mx = max(mx, scores[tok])
			}
			sum := 0.0
			for tok := range n {
				scores[tok] = math.Exp(scores[tok] - mx)
				sum += scores[tok]
			}
			for x := range c.HeadDim {
				ref := 0.0
				for tok := range n {
					ref += scores[tok] / sum * h(d.row(id, tok, layer, 1), kvh*c.HeadDim+x)
				}
				got := float64(math.Float32frombits(binary.LittleEndian.Uint32(out[4*(qo+x):])))
				worst = max(worst, math.Abs(got-ref))
			}
		}
	}
	t.Logf("%s: %s attention over %d sequences, max abs error %.2e", stage, k.Image(), len(ids), worst)
	require.LessOrEqual(t, worst, 1e-3, "%s: paged attention differs from contiguous attention", stage)
}

// After write_kv of known data, a compaction with no budget moves blocks, keeps every token's
// K and V of every layer (checksums read through the block tables), leaves attention through the
// tables equal to attention over contiguous K/V, reaches the optimal page count, and gives the
// emptied pages back to the device.
func TestCompactionKeepsKVAndAttention(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		cfg := kvcache.Config{
			Layers: 4, KVHeads: 2, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
			PageSize: 2 << 20, Capacity: 32 * (2 << 20), ReservePages: 1, HighWatermark: 8, NoBackground: true,
		}
		m := newManager(t, dev, cfg)
		c := m.Config()
		k, err := kernels.For(dev)
		require.NoError(t, err)
		t.Cleanup(func() { require.NoError(t, k.Close()) })

		r := rand.New(rand.NewPCG(1, 2))
		d := &kvData{cfg: c, rows: map[kvcache.SeqID][][][]byte{}}
		var live []kvcache.SeqID
		lens := make([]int, 60)
		for i := range lens {
			lens[i] = 20 + r.IntN(600)
			_, err := m.AppendTokens(kvcache.SeqID(i), lens[i], nil)
			require.NoError(t, err)
		}
		for i, n := range lens {
			id := kvcache.SeqID(i)
			if i%3 != 0 { // two of three finish: holes everywhere
				require.NoError(t, m.FreeSequence(id))
				continue
			}
			live = append(live, id)
			rows := make([][][]byte, n)
			for tok := range rows {
				rows[tok] = make([][]byte, 0, 2*c.Layers)
				for range 2 * c.Layers {
					rows[tok] = append(rows[tok], randomHalfs(r, int(c.TokenBytes()/2)))
				}
			}
			d.rows[id] = rows
		}
		writeAll(t, dev, k, m, d, live)
		checkAll(t, dev, m, d, live, "before compaction")
		checkAttention(t, dev, k, m, d, live, 2, 4, "before compaction")

		before := m.Stats()
		free0, _, err := dev.MemInfo()
		require.NoError(t, err)
		res, err := m.Compact(kvcache.CompactOptions{})
		require.NoError(t, err)
		st := m.Stats()
		t.Logf("compaction: %d blocks (%d KiB) moved, %d pages released; mapped pages %d -> %d for %d live blocks",
			res.BlocksMoved, res.BytesMoved>>10, res.PagesReleased, before.MappedPages, st.MappedPages, st.LiveBlocks)
		require.Positive(t, res.BlocksMoved)
		require.Positive(t, res.PagesReleased)
		assert.Equal(t, (st.LiveBlocks+st.BlocksPerPage-1)/st.BlocksPerPage+c.ReservePages, st.MappedPages, "the optimum")
		free1, _, err := dev.MemInfo()
		require.NoError(t, err)
		assert.InDelta(t, float64(uint64(res.PagesReleased)*c.PageSize), float64(free1-free0), float64(dev.Info().Granularity),
			"the device reports the released pages free")
		require.NoError(t, m.Verify())

		checkAll(t, dev, m, d, live, "after compaction")
		checkAttention(t, dev, k, m, d, live, 2, 4, "after compaction")
	})
}

// A failing copy leaves the manager exactly as before; a budget bounds the bytes moved.
func TestCompactionFaultsAndBudget(t *testing.T) {
	dev := vmm.InjectFaults(hostDevice(t, 32<<10))
	cfg := tinyConfig()
	cfg.HighWatermark = 16
	m := newManager(t, dev, cfg)
	for i := range 16 {
		_, err := m.AppendTokens(kvcache.SeqID(i), 6, nil) // 2 blocks: 2 sequences a page
		require.NoError(t, err)
	}
	for i := 0; i < 16; i += 2 {
		require.NoError(t, m.FreeSequence(kvcache.SeqID(i)))
	}
	before := shape(m.Stats())
	blocks, _ := m.Blocks(5, nil)
	dev.FailNth(vmm.OpCopy, 3, nil)
	_, err := m.Compact(kvcache.CompactOptions{})
	require.ErrorIs(t, err, vmm.ErrInjected)
	require.Equal(t, before, shape(m.Stats()))
	got, _ := m.Blocks(5, nil)
	require.Equal(t, blocks, got)
	require.NoError(t, m.Verify())

	budget := 4 * m.Config().BlockStride()
	res, err := m.Compact(kvcache.CompactOptions{MaxBytes: budget})
	require.NoError(t, err)
	assert.LessOrEqual(t, res.BytesMoved, budget)
	assert.Positive(t, res.BlocksMoved)
	require.NoError(t, m.Verify())
	res, err = m.Compact(kvcache.CompactOptions{})
	require.NoError(t, err)
	st := m.Stats()
	assert.Equal(t, (st.LiveBlocks+st.BlocksPerPage-1)/st.BlocksPerPage+m.Config().ReservePages, st.MappedPages)
}

// Reclaim with compaction says how many bytes it gave back, the pages the compaction emptied
// included: what the device reports free again.
func TestReclaimCountsCompactedPages(t *testing.T) {
	for _, try := range []bool{false, true} {
		dev := hostDevice(t, 32<<10)
		m := newManager(t, dev, tinyConfig())
		for i := range 16 {
			_, err := m.AppendTokens(kvcache.SeqID(i), 6, nil) // 2 blocks: 2 sequences a page
			require.NoError(t, err)
		}
		for i := 0; i < 16; i += 2 {
			require.NoError(t, m.FreeSequence(kvcache.SeqID(i))) // every page half empty, none free
		}
		free0, _, err := dev.MemInfo()
		require.NoError(t, err)
		var got uint64
		if try {
			got, _ = m.TryReclaim(math.MaxUint64, true)
		} else {
			got = m.Reclaim(math.MaxUint64, true, true)
		}
		free1, _, err := dev.MemInfo()
		require.NoError(t, err)
		require.Positive(t, free1-free0, "try %v: the compaction emptied pages", try)
		assert.Equal(t, free1-free0, got, "try %v: the bytes returned to the device", try)
		require.NoError(t, m.Verify())
	}
}

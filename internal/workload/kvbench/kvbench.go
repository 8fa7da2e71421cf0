// Package kvbench holds the manager's benchmarks, shared by the Go benchmarks of package
// kvcache and the bench program, so both measure exactly the same thing.
//
// Each benchmark keeps Live idle sequences (one full page's worth of one-block sequences per
// 64, so they leave no partially free page behind) beside a working batch of 256 sequences the
// operations run on: a runtime's batch is a few hundred sequences whatever the number waiting,
// and the question is whether the manager's costs grow with the number it holds.
package kvbench

import (
	"testing"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// Batch is the working batch size.
const Batch = 256

// Config is the geometry the benchmarks use: 64 blocks of 16 tokens per 256 KiB page, the
// blocks-per-page of a 32-layer, 8-head, 128-dim fp16 model's default page, scaled down in
// bytes so that 100,000 sequences fit the host backend.
func Config() kvcache.Config {
	return kvcache.Config{
		Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
		PageSize: 256 << 10, Capacity: 16384 * (256 << 10), ReservePages: 4, HighWatermark: 64,
	}
}

// HeldConfig is Config with a high watermark that keeps a decode batch's pages mapped (Batch
// sequences of 1,024 tokens take 256 of its pages): the batch that starts after one ends finds
// them there, where Config's watermark of 64 returns 192 pages between batches and the next
// maps them again, inside the timed steps. The hybrid comparisons use it on both sides: a
// Hybrid's groups hold their spare pages for a second (kvcache's hold), which Config's single
// manager does not, and with Config the one-group yardstick paid for mapping that the three
// groups did not.
func HeldConfig() kvcache.Config {
	c := Config()
	c.HighWatermark = 2 * Batch * 1024 / 16 / 64
	return c
}

type env struct {
	dev vmm.Device
	m   *kvcache.Manager
	bt  int
	bpp int
}

func setup(b *testing.B, live int) *env { return setupWith(b, live, Config()) }

func setupWith(b *testing.B, live int, cfg kvcache.Config) *env {
	b.Helper()
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 1 << 40})
	if err != nil {
		b.Fatal(err)
	}
	m, err := kvcache.New(dev, cfg)
	if err != nil {
		b.Fatal(err)
	}
	e := &env{dev: dev, m: m, bt: m.Config().BlockTokens, bpp: m.Stats().BlocksPerPage}
	var slots []int64
	for i := range live {
		if slots, err = m.AppendTokens(kvcache.SeqID(1<<32+i), e.bt, slots[:0]); err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() {
		if err := m.Close(); err != nil {
			b.Error(err)
		}
		if err := dev.Close(); err != nil {
			b.Error(err)
		}
	})
	return e
}

func (e *env) append(b *testing.B, id kvcache.SeqID, n int, slots []int64) []int64 {
	slots, err := e.m.AppendTokens(id, n, slots[:0])
	if err != nil {
		b.Fatal(err)
	}
	return slots
}

func (e *env) truncate(b *testing.B, id kvcache.SeqID, n int) {
	if err := e.m.Truncate(id, n); err != nil {
		b.Fatal(err)
	}
}

// AppendInBlock times AppendTokens(seq, 1) that lands in the sequence's last block.
func AppendInBlock(b *testing.B, live int) {
	e := setup(b, live)
	slots := make([]int64, 0, 64)
	for i := range Batch {
		slots = e.append(b, kvcache.SeqID(i), 1, slots)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		slots = e.append(b, kvcache.SeqID(i%Batch), 1, slots)
		i++
		if i == Batch*(e.bt-1) { // every block is full: back to one token each, untimed
			b.StopTimer()
			for s := range Batch {
				e.truncate(b, kvcache.SeqID(s), e.bt-1)
			}
			i = 0
			b.StartTimer()
		}
	}
}

// AppendNewBlock times AppendTokens(seq, 1) that starts a new block in the page of the
// sequence's last block.
func AppendNewBlock(b *testing.B, live int) {
	e := setup(b, live)
	slots := make([]int64, 0, 64)
	// Lay the batch out 8 to a page with room beside each: a sequence, then a 7-block spacer,
	// and free the spacers once all are placed.
	for i := range Batch {
		slots = e.append(b, kvcache.SeqID(i), e.bt, slots)
		slots = e.append(b, kvcache.SeqID(1<<31+i), 7*e.bt, slots)
	}
	for i := range Batch {
		if err := e.m.FreeSequence(kvcache.SeqID(1<<31 + i)); err != nil {
			b.Fatal(err)
		}
	}
	syncMaps := e.m.Stats().SyncMaps
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		slots = e.append(b, kvcache.SeqID(i), 1, slots)
		i++
		if i == Batch {
			b.StopTimer()
			for s := range Batch {
				e.truncate(b, kvcache.SeqID(s), 1)
			}
			i = 0
			b.StartTimer()
		}
	}
	if e.m.Stats().SyncMaps != syncMaps {
		b.Fatal("a new block needed a new page: the benchmark is not measuring what it says")
	}
}

// AppendNewPage times AppendTokens(seq, 1) that needs a new page, taken from the reserve of
// mapped free pages, together with the Truncate(seq, 1) that gives the page back (so every
// iteration starts alike). The pair is an upper bound for the append alone.
func AppendNewPage(b *testing.B, live int) {
	e := setup(b, live)
	slots := make([]int64, 0, 64*16)
	// One sequence filling one page exactly: its next token needs a page.
	slots = e.append(b, 0, e.bpp*e.bt, slots)
	if err := e.m.Settle(); err != nil {
		b.Fatal(err)
	}
	st := e.m.Stats()
	if st.PartialPages != 0 || st.FreePages == 0 {
		b.Fatalf("setup: %d partial and %d free pages; want none and some", st.PartialPages, st.FreePages)
	}
	syncMaps := st.SyncMaps
	b.ReportAllocs()
	for b.Loop() {
		slots = e.append(b, 0, 1, slots)
		e.truncate(b, 0, 1)
	}
	if e.m.Stats().SyncMaps != syncMaps {
		b.Fatal("an append waited for the driver: the reserve did not serve it")
	}
}

// FreeSequence1000 times FreeSequence of a 1,000-token sequence (63 blocks).
func FreeSequence1000(b *testing.B, live int) {
	e := setup(b, live)
	slots := make([]int64, 0, 1000)
	b.ReportAllocs()
	i := Batch
	for b.Loop() {
		if i == Batch {
			b.StopTimer()
			for s := range Batch {
				slots = e.append(b, kvcache.SeqID(s), 1000, slots)
			}
			i = 0
			b.StartTimer()
		}
		if err := e.m.FreeSequence(kvcache.SeqID(i)); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func exportSetup(b *testing.B, live int) (*env, []kvcache.SeqID) {
	e := setup(b, live)
	ids := make([]kvcache.SeqID, Batch)
	var slots []int64
	for i := range ids {
		ids[i] = kvcache.SeqID(i)
		slots = e.append(b, ids[i], 256*e.bt, slots)
	}
	return e, ids
}

// ExportVLLM times exporting the vLLM block table of 256 sequences of 256 blocks.
func ExportVLLM(b *testing.B, live int) {
	e, ids := exportSetup(b, live)
	t, err := blocktable.NewVLLM(Batch, 256, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := e.m.ExportVLLM(ids, t); err != nil {
			b.Fatal(err)
		}
	}
}

// ExportFlashInfer times exporting FlashInfer's CSR of 256 sequences of 256 blocks.
func ExportFlashInfer(b *testing.B, live int) {
	e, ids := exportSetup(b, live)
	f, err := blocktable.NewFlashInfer(Batch, Batch*256, e.bt)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := e.m.ExportFlashInfer(ids, f); err != nil {
			b.Fatal(err)
		}
	}
}

// Case is one benchmark with its target on the host backend, in ns per operation.
type Case struct {
	Name     string
	Fn       func(*testing.B, int)
	TargetNs float64
}

// Cases lists the benchmarks with the targets of the block manager issue.
var Cases = []Case{
	{"AppendTokens in block", AppendInBlock, 50},
	{"AppendTokens new block in page", AppendNewBlock, 150},
	{"AppendTokens new page from reserve (+Truncate)", AppendNewPage, 1000},
	{"FreeSequence 1000 tokens", FreeSequence1000, 2000},
	{"ExportVLLM 256x256", ExportVLLM, 20000},
	{"ExportFlashInfer 256x256", ExportFlashInfer, 20000},
}

// LiveCounts are the numbers of idle live sequences compared.
var LiveCounts = []int{1024, 102400}

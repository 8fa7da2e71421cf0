package ledger_test

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/vmm"
)

// BenchmarkAcquireRelease takes and returns one page's bytes: through a ledger file (the ledger
// lock is a file lock, two fcntl calls) and, as the yardstick in the same run, through an
// in-process vmm.Budget (a mutex). A page is mapped once per thousands of appends, and its
// driver calls cost tens of microseconds: the ledger's share of that is what "x budget" and
// "of a 50 µs map" report.
func BenchmarkAcquireRelease(b *testing.B) {
	const page = 2 << 20
	l, err := ledger.Open(filepath.Join(b.TempDir(), "l"), ledger.Options{Limit: 1 << 30})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	m, err := l.Join("bench", &holder{}, ledger.JoinOptions{})
	if err != nil {
		b.Fatal(err)
	}
	bm, err := vmm.NewBudget(1<<30).Join("bench", &holder{})
	if err != nil {
		b.Fatal(err)
	}
	const yard = 20000
	t0 := time.Now()
	for range yard {
		if err := bm.Acquire(page, false); err != nil {
			b.Fatal(err)
		}
		bm.Release(page)
	}
	budgetNs := float64(time.Since(t0).Nanoseconds()) / yard
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if err := m.Acquire(page, false); err != nil {
			b.Fatal(err)
		}
		m.Release(page)
	}
	ns := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	b.ReportMetric(ns/budgetNs, "x_budget")
	b.ReportMetric(100*ns/50000, "%_of_50µs_map")
}

// BenchmarkAcquireRefused is an acquisition the limit refuses while another member (through its
// mailbox, as in another process) has nothing to give: what an engine pays each time it tries
// to admit a request that does not fit. Both passes (free pages, then compaction) ask it once.
func BenchmarkAcquireRefused(b *testing.B) {
	path := filepath.Join(b.TempDir(), "l")
	a, err := ledger.Open(path, ledger.Options{Limit: 4 * unit})
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	o, err := ledger.Open(path, ledger.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer o.Close()
	full, err := a.Join("full", &holder{}, ledger.JoinOptions{})
	if err != nil {
		b.Fatal(err)
	}
	if err := full.Acquire(4*unit, false); err != nil {
		b.Fatal(err)
	}
	m, err := o.Join("asker", &holder{}, ledger.JoinOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := m.Acquire(unit, true); err == nil {
			b.Fatal("acquired beyond the limit")
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "µs/refusal")
}

package kvcache_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/proctest"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/vmm"
)

// pageTokens is one 2 MiB page of smallConfig: 64 blocks of 16 tokens.
const pageTokens = 64 * 16

// growRole is a serving process in a child: on backend args[0] ("host" or "cuda"), joined to
// the ledger at args[1] as model args[2], it keeps args[3] pages of live sequences and churns
// more on top (append until the limit refuses, free them, again), so its pages are mapped and
// unmapped all the time. It says "ready" once it holds its live pages, and answers "mapped"
// with its mapped bytes until stdin ends.
func growRole(args []string, in *bufio.Scanner, out io.Writer) error {
	var dev vmm.Device
	var err error
	if args[0] == "cuda" {
		dev, err = vmm.NewCUDADevice(0)
	} else {
		dev, err = vmm.NewHostDevice(vmm.HostOptions{Granularity: 2 << 20})
	}
	if err != nil {
		return err
	}
	defer dev.Close()
	l, err := ledger.Open(args[1], ledger.Options{})
	if err != nil {
		return err
	}
	defer l.Close()
	pool, err := kvcache.NewShared(dev, kvcache.SharedConfig{Ledger: l})
	if err != nil {
		return err
	}
	defer pool.Close()
	cfg := smallConfig()
	cfg.Capacity = 32 << 20
	cfg.NoBackground = false // the reserve goroutine maps and unmaps too
	m, err := pool.Register(args[2], cfg)
	if err != nil {
		return err
	}
	live, _ := strconv.Atoi(args[3])
	for s := range live {
		if _, err := m.AppendTokens(kvcache.SeqID(s), pageTokens, nil); err != nil {
			return fmt.Errorf("live page %d: %w", s, err)
		}
	}
	fmt.Fprintln(out, "ready")
	cmds := make(chan string)
	go func() {
		for in.Scan() {
			cmds <- in.Text()
		}
		close(cmds)
	}()
	next := kvcache.SeqID(1000)
	var churn []kvcache.SeqID
	for {
		select {
		case c, ok := <-cmds:
			if !ok {
				return nil
			}
			if c == "mapped" {
				fmt.Fprintln(out, "mapped", m.Stats().MappedBytes)
			}
		default:
		}
		if _, err := m.AppendTokens(next, 16, nil); err == nil {
			churn = append(churn, next)
			next++
			continue
		} else if !errors.Is(err, kvcache.ErrOutOfMemory) {
			return err
		}
		for _, s := range churn {
			if err := m.FreeSequence(s); err != nil {
				return err
			}
		}
		churn = churn[:0]
		time.Sleep(time.Millisecond)
	}
}

// Two serving processes share one ledger: the child keeps 5 of 8 pages live and churns on top;
// killed with SIGKILL mid-growth, its share comes back and the parent gets the whole limit (on
// a GPU, the device's free memory comes back too).
func TestLedgerTwoProcesses(t *testing.T) {
	run := func(t *testing.T, backend string, dev vmm.Device) {
		const limit = 8 << 20 * 2 // 8 pages of 2 MiB
		path := filepath.Join(t.TempDir(), "ledger")
		l, err := ledger.Open(path, ledger.Options{Limit: limit})
		require.NoError(t, err)
		t.Cleanup(func() { l.Close() })
		free0, _, err := dev.MemInfo()
		require.NoError(t, err)

		child := proctest.Start(t, "grow", backend, path, "child", "5")
		child.Expect("ready", 60*time.Second)
		pool, err := kvcache.NewShared(dev, kvcache.SharedConfig{Ledger: l, CompactOnPressure: true})
		require.NoError(t, err)
		t.Cleanup(func() { pool.Close() })
		m, err := pool.Register("parent", smallConfig())
		require.NoError(t, err)
		pages := 0
		for ; pages < 8; pages++ {
			if _, err := m.AppendTokens(kvcache.SeqID(pages), pageTokens, nil); err != nil {
				require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
				break
			}
		}
		t.Logf("beside the child the parent got %d of 8 pages", pages)
		require.LessOrEqual(t, pages, 3, "the child holds 5 of the 8 pages live")
		child.Send("mapped")
		childMapped, err := strconv.ParseUint(child.Expect("mapped ", 10*time.Second), 10, 64)
		require.NoError(t, err)
		require.GreaterOrEqual(t, childMapped, uint64(5<<21))
		s, err := l.Snapshot()
		require.NoError(t, err)
		require.Len(t, s.Members, 2)
		require.LessOrEqual(t, s.Used, uint64(limit))

		child.Kill9()
		if backend == "cuda" { // the driver returns the dead process's memory
			var free uint64
			require.Eventually(t, func() bool {
				free, _, _ = dev.MemInfo()
				return free+uint64(pages)<<21+(8<<20) >= free0
			}, 10*time.Second, 10*time.Millisecond, "device free %d MiB, before the child %d MiB", free>>20, free0>>20)
			t.Logf("device free: %d MiB before the child, %d MiB after its kill with %d parent pages mapped", free0>>20, free>>20, pages)
		}
		for ; pages < 8; pages++ {
			_, err := m.AppendTokens(kvcache.SeqID(pages), pageTokens, nil)
			require.NoError(t, err, "page %d of 8: the dead child's share came back", pages)
		}
		_, err = m.AppendTokens(100, 1, nil)
		require.ErrorIs(t, err, kvcache.ErrOutOfMemory, "the parent holds the whole limit")
		st := m.Stats()
		require.Equal(t, uint64(limit), st.MappedBytes)
		require.NoError(t, m.Verify())
		s, err = l.Snapshot()
		require.NoError(t, err)
		require.Len(t, s.Members, 1)
		require.Equal(t, uint64(limit), s.Used)
		require.NoError(t, l.Check())
	}
	backends(t, func(t *testing.T, dev vmm.Device) {
		backend := "host"
		if dev.Info().Kind == vmm.MemoryDevice {
			backend = "cuda"
		}
		run(t, backend, dev)
	})
}

// A driver call failing while a model of a ledger-backed pool grows (create, map, set access)
// leaves the ledger holding exactly the model's mapped pages, and the model consistent.
func TestLedgerFaults(t *testing.T) {
	for _, op := range []vmm.Op{vmm.OpCreate, vmm.OpMap, vmm.OpSetAccess} {
		t.Run(string(op), func(t *testing.T) {
			dev := vmm.InjectFaults(hostDevice(t, 2<<20))
			l, err := ledger.Open(filepath.Join(t.TempDir(), "ledger"), ledger.Options{Limit: 8 << 21})
			require.NoError(t, err)
			defer l.Close()
			pool, err := kvcache.NewShared(dev, kvcache.SharedConfig{Ledger: l})
			require.NoError(t, err)
			defer pool.Close()
			m, err := pool.Register("m", smallConfig())
			require.NoError(t, err)
			_, err = m.AppendTokens(1, pageTokens, nil)
			require.NoError(t, err)
			require.NoError(t, dev.FailAlways(op, nil))
			seq := kvcache.SeqID(2)
			for ; err == nil; seq++ { // until an append needs a page the driver will not give
				_, err = m.AppendTokens(seq, pageTokens, nil)
			}
			require.ErrorIs(t, err, vmm.ErrInjected)
			require.Equal(t, m.Stats().MappedBytes, l.Used(), "the ledger got back what the failed map acquired")
			require.NoError(t, m.Verify())
			dev.Clear()
			_, err = m.AppendTokens(seq, pageTokens, nil)
			require.NoError(t, err)
			require.Equal(t, m.Stats().MappedBytes, l.Used())
		})
	}
}

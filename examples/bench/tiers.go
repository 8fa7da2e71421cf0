package main

import (
	"cmp"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"time"

	"github.com/pagedkv/pagedkv/internal/workload/tierbench"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/redis"
	"github.com/pagedkv/pagedkv/vmm"
)

// tierDir is where the tiers section puts its disk store and yardstick file: a temporary
// directory under os.TempDir() when empty.
var tierDir string

// tierSizes are the block sizes the tiers section measures.
var tierSizes = []int{16 << 10, 256 << 10}

// benchTiers measures the storage tiers below the host, whatever the device: a disk store's
// and a Redis store's Put and Get throughput against yardsticks measured in the same run.
func benchTiers(_ vmm.Device, iters int) ([]Table, error) {
	rounds := 21
	if iters == 0 {
		rounds = 3
	}
	dt, err := benchDiskTier(rounds)
	if err != nil {
		return nil, fmt.Errorf("disk: %w", err)
	}
	rt, err := benchRedisTier(rounds)
	if err != nil {
		return nil, fmt.Errorf("redis: %w", err)
	}
	return []Table{dt, rt}, nil
}

var tierColumns = []string{"block", "op", "store GB/s", "yardstick GB/s", "store / yardstick", "goal", "mode"}

// tierRows renders one block size's put and get figures.
func tierRows(blockBytes int, put, get tierbench.Figure) [][]string {
	var rows [][]string
	for _, r := range []struct {
		op string
		f  tierbench.Figure
	}{{"put", put}, {"get", get}} {
		mode := cmp.Or(r.f.Mode, put.Mode, "-")
		rows = append(rows, []string{fmt.Sprintf("%d KiB", blockBytes>>10), r.op, fmt.Sprintf("%.2f", r.f.StoreGBps),
			fmt.Sprintf("%.2f", r.f.YardGBps), fmt.Sprintf("%.2f", r.f.Ratio), goal(r.f.Ratio >= 0.80), mode})
	}
	return rows
}

func benchDiskTier(rounds int) (Table, error) {
	dir := tierDir
	if dir == "" {
		d, err := os.MkdirTemp("", "pagedkv-tierbench-")
		if err != nil {
			return Table{}, err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	t := Table{
		Title: "Disk tier: disk.Store against a sequential write and read of the same bytes",
		Note: fmt.Sprintf("Batches of %d blocks; a round moves about 32 MiB each way. Put writes new blocks (each evicting as many, whole segments, whose files later segments overwrite); Get reads one batch. "+
			"Yardstick: the same padded records written in sequence over one preallocated file of a round's size (each round writes as many distinct bytes as the store's Puts, never the same place twice), or read from its first batch (the same blocks the store's Get reads), one call per record, with the store's flags (mode). "+
			"Rounds alternate store and yardstick; medians of %d rounds, the ratio the median of the rounds' ratios. Goal: at least 0.80. Directory: %s.", tierbench.Batch, rounds, dir),
		Columns: tierColumns,
	}
	for _, n := range tierSizes {
		sub, err := os.MkdirTemp(dir, "run-")
		if err != nil {
			return t, err
		}
		put, get, err := tierbench.Disk(sub, n, rounds)
		_ = os.RemoveAll(sub)
		if err != nil {
			return t, fmt.Errorf("%d KiB blocks: %w", n>>10, err)
		}
		t.Rows = append(t.Rows, tierRows(n, put, get)...)
	}
	return t, nil
}

func benchRedisTier(rounds int) (Table, error) {
	t := Table{
		Title: "Cluster tier: redis.Store against raw pipelined SET and GET from the same client",
		Note: fmt.Sprintf("Batches of %d blocks, each call's pipelines as mode says (Options.Pipelines: a large Put spreads over 2 where GOMAXPROCS >= 4), on a redis-server the bench starts on loopback; a round moves about 32 MiB each way. "+
			"Yardstick: pipelined SETs and GETs of values as long as the encoded blocks (header and data), through the store's own go-redis client (Store.Client), over as many pipelines at once as the store. "+
			"The store adds the encoding on Put and the checks and copy on Get. Medians of %d rounds, alternating. Goal: at least 0.80.", tierbench.Batch, rounds),
		Columns: tierColumns,
	}
	addr, stop, err := startRedis()
	if err != nil {
		t.Rows = append(t.Rows, []string{"-", "-", "-", "-", "-", "skipped: " + err.Error(), "-"})
		return t, nil
	}
	defer stop()
	for _, n := range tierSizes {
		s, err := redis.Open(redis.Options{Addrs: []string{addr}, Model: "tierbench", Fingerprint: tier.Fingerprint{1}, BlockBytes: n, Timeout: 10 * time.Second})
		if err != nil {
			return t, err
		}
		put, get, err := tierbench.Redis(s, n, rounds)
		_ = s.Close()
		if err != nil {
			return t, fmt.Errorf("%d KiB blocks: %w", n>>10, err)
		}
		t.Rows = append(t.Rows, tierRows(n, put, get)...)
	}
	return t, nil
}

// startRedis starts redis-server on a free loopback port, without persistence, and returns
// its address and how to stop it. Without redis-server on PATH it returns "no redis-server".
func startRedis() (string, func(), error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return "", nil, fmt.Errorf("no redis-server")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	cmd := exec.Command(bin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	stop := func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for range 100 {
		if c, err := net.Dial("tcp", addr); err == nil {
			_ = c.Close()
			return addr, stop, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop()
	return "", nil, fmt.Errorf("redis-server did not listen on %s", addr)
}

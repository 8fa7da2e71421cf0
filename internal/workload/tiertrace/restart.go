package tiertrace

import (
	"github.com/pagedkv/pagedkv/internal/workload/chattrace"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/tier/disk"
)

// Part says which part of Trace a process replays.
type Part int

const (
	// Whole replays the whole trace, counting the second half: the process that never stopped.
	Whole Part = iota
	// FirstHalf replays the first half: the process killed half-way.
	FirstHalf
	// SecondHalf rebuilds the conversations of the first half without a cache and replays the
	// second half: the process started again.
	SecondHalf
)

// DiskLimit bounds the disk tier of the restart experiments: room for every block of Trace.
const DiskLimit = 512 << 20

// RunPart replays part of Trace on a replica whose disk tier is the directory dir (a warm
// restart finds there what an earlier process wrote). It leaves the replica open for
// FirstHalf, whose process is then killed; it returns what the counted steps saw. Each
// request's blocks reach the disk before the trace goes on (Checked.Sync): the pace of real
// decoding, which a replay without compute outruns a thousandfold; the disk tier's own
// throughput is its benchmarks' (tier/disk).
func RunPart(dir string, part Part) (chattrace.Result, kvcache.TierStats, error) {
	var ts kvcache.TierStats
	cfg := Config()
	s, err := disk.Open(dir, disk.Options{Fingerprint: cfg.Fingerprint(), BlockBytes: int(cfg.BlockStride()), LimitBytes: DiskLimit})
	if err != nil {
		return chattrace.Result{}, ts, err
	}
	cfg.Tiers = []kvcache.Tier{{Store: s, Medium: "DISK"}}
	r, err := NewReplica(cfg)
	if err != nil {
		_ = s.Close()
		return chattrace.Result{}, ts, err
	}
	o := Trace()
	half := Steps(o) / 2
	switch part {
	case Whole:
		o.Count = half
	case FirstHalf:
		o.Stop = half
	case SecondHalf:
		o.Skip = half
	}
	res, err := chattrace.Run(&Checked{Replicas: []*Replica{r}, Sync: true}, o, cfg.BlockTokens)
	if part == FirstHalf && err == nil {
		return res, ts, nil // killed by the caller, as it is
	}
	ts = r.M.Stats().Prefix.Tiers[0]
	if e := r.Close(); err == nil {
		err = e
	}
	if e := s.Close(); err == nil {
		err = e
	}
	return res, ts, err
}

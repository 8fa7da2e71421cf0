package tiertrace

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/internal/workload/chattrace"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/tier/redis"
)

// Fleet is a set of replicas sharing a cluster tier.
type Fleet struct {
	Replicas int
	Addrs    []string // the Redis servers; none: no cluster tier
	Cluster  bool     // Redis Cluster
	Seed     uint64   // of the routing
	Before   func(started int)
}

// Shared replays Trace on f's replicas with requests routed at random, each with a cluster
// tier on f's Redis servers and a client of its own, as separate processes would, and returns
// what the trace saw, with the replicas' tier counters added up. Each replica writes its tier's
// queue when a request ends (Checked.Sync).
func Shared(f Fleet) (chattrace.Result, kvcache.TierStats, error) {
	var res chattrace.Result
	var sum kvcache.TierStats
	n, addrs, cluster := f.Replicas, f.Addrs, f.Cluster
	cfg := Config()
	c := &Checked{Sync: len(addrs) > 0, Seed: f.Seed, Before: f.Before}
	var stores []*redis.Store
	defer func() {
		for _, r := range c.Replicas {
			_ = r.Close()
		}
		for _, s := range stores {
			_ = s.Close()
		}
	}()
	for range n {
		rc := cfg
		if len(addrs) > 0 {
			s, err := redis.Open(redis.Options{Addrs: addrs, Cluster: cluster, Model: "tiertrace", Fingerprint: cfg.Fingerprint(),
				BlockBytes: int(cfg.BlockStride()), Timeout: cfg.TierTimeout})
			if err != nil {
				return res, sum, err
			}
			stores = append(stores, s)
			rc.Tiers = []kvcache.Tier{{Store: s, Medium: "CLUSTER"}}
		}
		r, err := NewReplica(rc)
		if err != nil {
			return res, sum, err
		}
		c.Replicas = append(c.Replicas, r)
	}
	res, err := chattrace.Run(c, Trace(), cfg.BlockTokens)
	if err != nil {
		return res, sum, err
	}
	for _, r := range c.Replicas {
		for _, t := range r.M.Stats().Prefix.Tiers {
			sum.HitTokens += t.HitTokens
			sum.Stored += t.Stored
			sum.Failures += t.Failures
			sum.Store.Corrupt += t.Store.Corrupt
		}
		if err := r.M.Verify(); err != nil {
			return res, sum, fmt.Errorf("tiertrace: %w", errors.Join(err))
		}
	}
	return res, sum, nil
}

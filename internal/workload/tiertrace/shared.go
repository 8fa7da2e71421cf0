package tiertrace

import (
	"errors"
	"fmt"

	"github.com/pagedkv/pagedkv/internal/workload/chattrace"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/tier/redis"
)

// Shared replays Trace on n replicas with requests routed at random (Seed), each with a cluster
// tier on the Redis servers at addrs (none when addrs is empty; Redis Cluster with cluster),
// each replica with a client of its own as separate processes would, and returns what the
// trace saw, with the replicas' tier counters added up. Each replica writes its tier's queue
// when a request ends (Checked.Sync).
func Shared(n int, addrs []string, cluster bool, seed uint64) (chattrace.Result, kvcache.TierStats, error) {
	var res chattrace.Result
	var sum kvcache.TierStats
	cfg := Config()
	c := &Checked{Sync: len(addrs) > 0, Seed: seed}
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
				BlockBytes: int(cfg.BlockStride())})
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

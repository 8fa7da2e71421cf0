package redis_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/redistest"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier/redis"
)

// benchBatch blocks of benchBlock bytes: a 16-block prefix of a model with 256 KiB blocks.
const (
	benchBlock = 256 << 10
	benchBatch = 16
)

// benchStores opens a store on a single node (with its default pipelines, and with one) and
// one on a 3-master cluster.
func benchStores(b *testing.B) map[string]*redis.Store {
	edit := func(o *redis.Options) { o.BlockBytes = benchBlock }
	node := redistest.Start(b).Addr
	return map[string]*redis.Store{
		"node":            open(b, []string{node}, edit),
		"node-1-pipeline": open(b, []string{node}, func(o *redis.Options) { edit(o); o.Pipelines = 1 }),
		"cluster":         open(b, redistest.StartCluster(b, 3).Addrs(), edit),
	}
}

func BenchmarkPut(b *testing.B) {
	for name, s := range benchStores(b) {
		b.Run(name, func(b *testing.B) {
			blocks := chain(prefix.Namespace{Salt: "bench"}, 1, benchBatch, benchBlock)
			ctx := context.Background()
			b.SetBytes(benchBatch * benchBlock)
			b.ReportAllocs()
			for b.Loop() {
				if err := s.Put(ctx, blocks); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkGet(b *testing.B) {
	for name, s := range benchStores(b) {
		b.Run(name, func(b *testing.B) {
			ns := prefix.Namespace{Salt: "bench"}
			blocks := chain(ns, 2, benchBatch, benchBlock)
			ctx := context.Background()
			require.NoError(b, s.Put(ctx, blocks))
			keys := keysOf(blocks)
			dst := buffers(benchBatch, benchBlock)
			b.SetBytes(benchBatch * benchBlock)
			b.ReportAllocs()
			for b.Loop() {
				n, err := s.Get(ctx, ns, keys, dst)
				if err != nil || n != benchBatch {
					b.Fatalf("got %d blocks: %v", n, err)
				}
			}
		})
	}
}

package redis_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/redis"
)

// A replica writes a computed block behind, and another replica of the same model reads it.
// Errors are misses: the caller computes the blocks instead. The example needs a server on
// localhost:6379, so it is compiled but not run by go test.
func ExampleOpen() {
	store, err := redis.Open(redis.Options{
		Addrs:       []string{"localhost:6379"}, // several addresses: a Redis Cluster
		Model:       "llama-3-8b",
		Fingerprint: tier.Fingerprint{1}, // kvcache derives it from the geometry
		BlockBytes:  256 << 10,
		Timeout:     50 * time.Millisecond,
	})
	if err != nil {
		fmt.Println(err) // invalid options only: Open does not connect
		return
	}
	defer store.Close()
	ctx := context.Background()

	ns := prefix.Namespace{Salt: "tenant-a"}
	block := tier.Block{NS: ns, Key: prefix.Key{7}, Parent: prefix.Root(ns, 16), Data: make([]byte, 256<<10)}
	if err := store.Put(ctx, []tier.Block{block}); errors.Is(err, redis.ErrUnavailable) {
		fmt.Println("not cached:", err)
	}

	dst := [][]byte{make([]byte, 256<<10)}
	n, err := store.Get(ctx, ns, []prefix.Key{block.Key}, dst)
	if err != nil {
		n = 0 // a store that is down is a miss
	}
	fmt.Printf("%d of 1 blocks served, %d failures\n", n, store.Stats().Failures)
}

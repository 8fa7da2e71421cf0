package disk_test

import (
	"context"
	"fmt"
	"os"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
)

// A disk tier keeps blocks across a restart: the second Open finds them in their files.
func Example() {
	dir, err := os.MkdirTemp("", "disktier")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	opt := disk.Options{Fingerprint: tier.Fingerprint{1}, BlockBytes: 4096, LimitBytes: 1 << 20}
	ctx := context.Background()
	ns := prefix.Namespace{Salt: "tenant"}

	s, err := disk.Open(dir, opt)
	if err != nil {
		fmt.Println(err)
		return
	}
	root := prefix.Root(ns, 16)
	var h prefix.Hasher
	key := h.Next(root, []prefix.Token{1, 2, 3})
	data := make([]byte, 4096)
	copy(data, "K and V rows")
	if err := s.Put(ctx, []tier.Block{{NS: ns, Key: key, Parent: root, Data: data}}); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("bytes on disk:", s.Stats().Bytes)
	s.Close()

	s, err = disk.Open(dir, opt)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Close()
	dst := [][]byte{make([]byte, 4096)}
	n, err := s.Get(ctx, ns, []prefix.Key{key}, dst)
	fmt.Println("restored:", s.Stats().Restored, "got:", n, err, string(dst[0][:12]))
	n, _ = s.Get(ctx, prefix.Namespace{Salt: "other"}, []prefix.Key{key}, dst)
	fmt.Println("other tenant got:", n)
	// Output:
	// bytes on disk: 8192
	// restored: 1 got: 1 <nil> K and V rows
	// other tenant got: 0
}

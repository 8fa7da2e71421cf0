package vmm_test

import (
	"fmt"

	"github.com/pagedkv/pagedkv/vmm"
)

// Reserve a large virtual range, map pages on demand, give them back. On a GPU, open "cuda".
func ExamplePool() {
	dev, err := vmm.Open("host")
	if err != nil {
		panic(err)
	}
	defer dev.Close()
	pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: 64 << 30})
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	fmt.Println("physical before:", pool.Stats().PhysicalBytes)

	page := pool.PageSize()
	a, _ := pool.Map(10*page, 4*page) // four pages as ONE mapping
	_ = dev.CopyIn(a, []byte("hello"))
	buf := make([]byte, 5)
	_ = dev.CopyOut(buf, a)
	st := pool.Stats()
	fmt.Printf("%s; physical %d MiB in %d mapping(s)\n", buf, st.PhysicalBytes>>20, st.Mappings)

	_ = pool.Unmap(10*page, 4*page)
	fmt.Println("physical after:", pool.Stats().PhysicalBytes)
	// Output:
	// physical before: 0
	// hello; physical 8 MiB in 1 mapping(s)
	// physical after: 0
}

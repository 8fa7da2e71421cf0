package chattrace

import (
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
)

// Manager drives a kvcache.Manager. With Settle set, the manager's watermarks are applied after
// every request ends (what its reserve goroutine does in the background).
type Manager struct {
	M      *kvcache.Manager
	Settle bool
	slots  []int64
}

// Start implements Cache.
func (c *Manager) Start(id uint64, p []prefix.Token) (int, error) {
	return c.M.StartSequence(kvcache.SeqID(id), kvcache.Prompt{Tokens: p})
}

// Append implements Cache.
func (c *Manager) Append(id uint64, ids []prefix.Token) error {
	var err error
	c.slots, err = c.M.AppendTokenIDs(kvcache.SeqID(id), ids, c.slots[:0])
	return err
}

// Free implements Cache.
func (c *Manager) Free(id uint64) error {
	if err := c.M.FreeSequence(kvcache.SeqID(id)); err != nil {
		return err
	}
	if c.Settle {
		return c.M.Settle()
	}
	return nil
}

// Blocks implements Cache.
func (c *Manager) Blocks() (held, idle int) {
	st := c.M.Stats()
	return st.LiveBlocks, st.Prefix.IdleBlocks
}

// MappedPages implements Cache.
func (c *Manager) MappedPages() int { return c.M.Stats().MappedPages }

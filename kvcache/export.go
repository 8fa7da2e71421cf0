package kvcache

import (
	"fmt"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/sequence"
)

// rows is what both table formats take: one row per sequence.
type rows interface {
	Reset()
	AppendRow(blocks []int32, tokens int) error
}

// ExportVLLM writes the block tables and lengths of seqs, in that order, as rows of t (vLLM's
// block_tables and seq_lens). It allocates nothing. On an error t is left empty; a nil t is
// ErrInvalidArgument.
func (m *Manager) ExportVLLM(seqs []SeqID, t *blocktable.VLLM) error {
	if !m.made() {
		return notMadeCall("export")
	}
	if t == nil {
		return fmt.Errorf("kvcache: export: %w: nil vLLM table", ErrInvalidArgument)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.export(seqs, t)
}

// ExportFlashInfer writes the paged-KV CSR of seqs, in that order, into f (FlashInfer's
// kv_indptr, kv_indices, kv_last_page_len). It allocates nothing. On an error f is left empty;
// a nil f is ErrInvalidArgument.
func (m *Manager) ExportFlashInfer(seqs []SeqID, f *blocktable.FlashInfer) error {
	if !m.made() {
		return notMadeCall("export")
	}
	if f == nil {
		return fmt.Errorf("kvcache: export: %w: nil FlashInfer table", ErrInvalidArgument)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if f.BlockTokens != m.cfg.BlockTokens {
		f.Reset()
		return fmt.Errorf("kvcache: export: %w: FlashInfer table made for %d tokens per block, the cache has %d", ErrInvalidArgument, f.BlockTokens, m.cfg.BlockTokens)
	}
	return m.export(seqs, f)
}

func (m *Manager) export(seqs []SeqID, t rows) error {
	t.Reset()
	if m.closed {
		return fmt.Errorf("kvcache: export: %w", ErrClosed)
	}
	for _, id := range seqs {
		s, err := m.lookup("export", id)
		if err != nil {
			t.Reset()
			return err
		}
		if s.Swapped {
			t.Reset()
			return &SequenceError{Op: "export", Seq: id, Err: ErrSwapped}
		}
		if err := t.AppendRow(sequence.Int32s(s.Blocks), s.Tokens); err != nil {
			t.Reset()
			return &SequenceError{Op: "export", Seq: id, Err: err}
		}
	}
	return nil
}

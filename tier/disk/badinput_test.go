package disk_test

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
)

// A directory that is a file, or lies under one, is an *ArgumentError at Open: a mistake in
// the configuration, not a fault that may pass.
func TestOpenOnAFileIsAnArgumentError(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	require.NoError(t, os.WriteFile(file, []byte("x"), 0o644))
	for _, dir := range []string{file, filepath.Join(file, "below")} {
		s, err := disk.Open(dir, opts(4))
		require.Nil(t, s)
		var ae *disk.ArgumentError
		require.ErrorAs(t, err, &ae, dir)
		assert.Equal(t, "dir", ae.Name)
		assert.Equal(t, file+" is a file, not a directory", ae.Reason)
		require.ErrorIs(t, err, tier.ErrInvalidArgument)
	}
	b, err := os.ReadFile(file)
	require.NoError(t, err)
	assert.Equal(t, "x", string(b), "the file is left alone")
}

// A file the filesystem refuses to create (EROFS from a read-only mount, EACCES from a directory
// without write permission) fails the Put with ErrReadOnly, counted, and serves what is held.
// The fault seam stands in for the mount: as root, chmod stops nothing.
func TestReadOnlyCreateFailsThePut(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EROFS, syscall.EACCES} {
		t.Run(errno.Error(), func(t *testing.T) {
			ctx := context.Background()
			s, fault, err := disk.OpenFaulty(t.TempDir(), opts(8))
			require.NoError(t, err)
			defer s.Close()
			ns := prefix.Namespace{}
			held := chain(ns, 2, 30)
			require.NoError(t, s.Put(ctx, held))
			fault.ArmErrno("write", 1, "", errno)
			err = s.Put(ctx, chain(ns, 2, 31))
			require.ErrorIs(t, err, disk.ErrReadOnly)
			require.ErrorIs(t, err, tier.ErrUnavailable)
			require.ErrorIs(t, err, errno)
			assert.Equal(t, uint64(1), s.Stats().Failures)
			n, err := s.Get(ctx, ns, keysOf(held), dsts(2))
			require.NoError(t, err)
			assert.Equal(t, 2, n)
		})
	}
}

// A directory without write permission: Open of a new store fails with ErrReadOnly, and a store
// opened before the chmod fails its Puts with ErrReadOnly, counted, and still serves its
// blocks. Root ignores the mode, so this runs only as another user.
func TestReadOnlyDirectory(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root writes through chmod 0500; TestReadOnlyCreateFailsThePut covers EACCES")
	}
	ctx := context.Background()
	fresh := filepath.Join(t.TempDir(), "fresh")
	require.NoError(t, os.Mkdir(fresh, 0o500))
	s, err := disk.Open(fresh, opts(4))
	require.Nil(t, s)
	require.ErrorIs(t, err, disk.ErrReadOnly)

	dir := t.TempDir()
	s = open(t, dir, opts(8))
	defer s.Close()
	ns := prefix.Namespace{}
	held := chain(ns, 2, 32)
	require.NoError(t, s.Put(ctx, held))
	chmodTree(t, dir, 0o500)
	t.Cleanup(func() { chmodTree(t, dir, 0o755) })
	err = s.Put(ctx, chain(ns, 2, 33))
	require.ErrorIs(t, err, disk.ErrReadOnly)
	require.ErrorIs(t, err, syscall.EACCES)
	assert.Equal(t, uint64(1), s.Stats().Failures)
	n, err := s.Get(ctx, ns, keysOf(held), dsts(2))
	require.NoError(t, err)
	assert.Equal(t, 2, n)
}

// chmodTree sets the mode of dir and every directory below it.
func chmodTree(t *testing.T, dir string, mode os.FileMode) {
	t.Helper()
	require.NoError(t, filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		return os.Chmod(p, mode)
	}))
}

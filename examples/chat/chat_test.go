package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/gputest"
)

// transcript runs turns of the demo on a device and returns the user and bot lines.
func transcript(t *testing.T, device string, compact bool, turns int) string {
	t.Helper()
	c, err := newChat(device, compact, 8)
	require.NoError(t, err)
	var lines []string
	for i := range turns {
		lines = append(lines, demo[i%len(demo)])
	}
	var out bytes.Buffer
	require.NoError(t, c.run(lines, &out))
	require.NoError(t, c.close())
	require.Positive(t, c.answers)
	require.Equal(t, c.answers, c.right, "every answer must be right:\n%s", out.String())
	var conv []string
	for _, l := range strings.Split(out.String(), "\n") {
		if strings.HasPrefix(l, "you> ") || strings.HasPrefix(l, "bot> ") {
			conv = append(conv, l)
		}
	}
	return strings.Join(conv, "\n")
}

// The answers are right, and the same whether the cache is compacted between every turn or
// never (compaction moves the conversation's blocks; the answers are read back through them).
func TestChatCompactionChangesNothing(t *testing.T) {
	every := transcript(t, "host", true, 24)
	never := transcript(t, "host", false, 24)
	require.Equal(t, never, every)
	require.Contains(t, every, "bot> !VKDEGAP ,OLLEh")
}

// The same loop on the GPU says exactly what it says on the host.
func TestChatSameOnGPU(t *testing.T) {
	gputest.Require(t)
	host := transcript(t, "host", true, 24)
	gpu := transcript(t, "cuda", true, 24)
	require.Equal(t, host, gpu)
	require.Equal(t, host, transcript(t, "cuda", false, 24))
}

package main

import (
	"bytes"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/gputest"
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

// Each turn re-sends the whole conversation, and from the second turn of a conversation on all
// of the previous request (its prompt and answer) comes from the prefix cache in whole blocks,
// blocks that compaction moved between turns included, while the answers, read through those
// blocks, stay right.
func TestChatReusesTheCache(t *testing.T) {
	c, err := newChat("host", true, 8)
	require.NoError(t, err)
	var out bytes.Buffer
	require.NoError(t, c.run(demo, &out))
	require.NoError(t, c.close())
	require.Equal(t, c.answers, c.right)
	re := regexp.MustCompile(`prompt (\d+) tokens, (\d+) from the cache`)
	prev, answer, turns := 0, 0, 0 // the previous request's tokens; this turn's answer
	for _, l := range strings.Split(out.String(), "\n") {
		switch {
		case strings.HasPrefix(l, "-- reset"):
			prev = 0
		case strings.HasPrefix(l, "bot> "):
			answer = len(l) - len("bot> ")
		}
		m := re.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		prompt, _ := strconv.Atoi(m[1])
		cached, _ := strconv.Atoi(m[2])
		require.Equal(t, prev/16*16, cached, "the previous request, in whole blocks: %s", l)
		prev = prompt + answer
		turns++
	}
	require.Equal(t, c.answers, turns)
}

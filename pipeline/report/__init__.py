"""What a run shows: figures of student runs, qualitative pictures of boxes, and renders of cache contents."""

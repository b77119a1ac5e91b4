"""Storage backends: each module opens one kind of member URI as a BlockDevice."""

"""The edit's math on plain tensors: refusal directions, subspaces, closed-form weight edits."""

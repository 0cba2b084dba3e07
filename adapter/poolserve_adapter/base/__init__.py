"""What every endpoint slice shares: the shapes (protocol), the serving pipeline and its guards
(serving), prompt encoding (encoding), pair scoring (scoring) and the app-state accessors (dependencies).
Slices import from here; nothing here imports a slice."""

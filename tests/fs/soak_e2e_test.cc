// Soak test: see below (being written).

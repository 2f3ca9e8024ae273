"""What a sub-network says: chains through its kept filters (paper 4.3-4.4) and feature visualisation."""

SELECT count(DISTINCT pettype) FROM pets

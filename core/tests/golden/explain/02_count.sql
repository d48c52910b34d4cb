SELECT count(*) FROM pets WHERE weight  >  10

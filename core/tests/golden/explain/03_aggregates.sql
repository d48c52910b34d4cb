SELECT avg(age) ,  min(age) ,  max(age) FROM singer WHERE country  =  'France'
